"""Scale benchmark (issue #17): peak memory and time of a CLI run as the calibration set grows.

The workload: the bundled ``tiniest`` on Fashion-MNIST's official 60,000 training images as one
local ``.npz`` (calibration and test drawn disjointly from it), scores Softmax, KNN @ 1-11,
DeepMahalanobis @ 1-11, Gram @ 1-5, 1-11, 1-12, scenarios vertical flip and MNIST, 5,000 test
images; per ``n_calibration`` it prints peak RSS (GB), wall time, the shared forward passes, each
score's own time, the AUROCs and the bare forward passes over the same images (the floor a run
cannot beat). Each size runs in a fresh process, so peak RSS is that run's own.

Set-up: ``apt-get install dataset-fashion-mnist`` (the 60k training images; the script says so
when they are missing). Run alone on a quiet machine (parallel jobs distort timings)::

    .venv/bin/python benchmarks/bench_scale.py            # n = 5,000, 20,000, 50,000
    .venv/bin/python benchmarks/bench_scale.py --n 5000 --json
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FMNIST = Path("/usr/share/datasets/fashion-mnist")
BASELINE_AUROC_5K = {
    "Softmax() | Vertical flip | AUC()": 0.8855890399999999,
    "Softmax() | MNIST digits | AUC()": 0.8725214400000001,
    "KNN(k=15) | Vertical flip | AUC()": 0.9400265199999999,
    "KNN(k=15) | MNIST digits | AUC()": 0.8979002000000001,
    "DeepMahalanobis() | Vertical flip | AUC()": 0.9523436000000001,
    "DeepMahalanobis() | MNIST digits | AUC()": 0.9595822800000001,
    "Gram() | Vertical flip | AUC()": 0.9054838399999999,
    "Gram() | MNIST digits | AUC()": 0.96960848,
}
"""AUROCs at n_calibration = 5,000 of the in-memory path before the streaming work (commit
8a5f63d, this script's workload): the streamed path must give them within 1e-6."""
NPZ = Path(tempfile.gettempdir()) / "ood-lens-bench" / "fashion_mnist_train_60k.npz"
N_TEST = 5000


def _idx(path: Path) -> np.ndarray:
    """A gzipped IDX file (the MNIST format) as a uint8 array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def build_npz() -> Path:
    """Fashion-MNIST's 60k training images ``(N, 1, 28, 28)`` uint8 and labels as one ``.npz``."""
    if NPZ.exists():
        return NPZ
    images = FMNIST / "train-images-idx3-ubyte.gz"
    if not images.exists():
        sys.exit(f"{images} is missing: apt-get install dataset-fashion-mnist")
    NPZ.parent.mkdir(parents=True, exist_ok=True)
    x = _idx(images)[:, None]
    y = _idx(FMNIST / "train-labels-idx1-ubyte.gz").astype(np.int64)
    np.savez(NPZ, images=x, labels=y)
    return NPZ


PARQUET = NPZ.with_suffix(".parquet")


def build_parquet() -> Path:
    """The same 60k images as an HF-style parquet file (PNG bytes per row), for the streamed
    path (``[data] streaming = true``)."""
    if PARQUET.exists():
        return PARQUET
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    arrays = np.load(build_npz())

    def png(img: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        return buf.getvalue()

    rows = [{"bytes": png(img[0]), "path": None} for img in arrays["images"]]
    table = pa.table({"image": rows, "label": arrays["labels"].tolist()})
    pq.write_table(table, PARQUET, row_group_size=1000)
    return PARQUET


def config_text(npz: Path, n_calibration: int, streaming: bool = False) -> str:
    return (
        '[model]\nrepo = "bundled"\nentry = "tiniest"\n\n'
        f'[data]\nind_dataset = "{npz}"\nn_calibration = {n_calibration}\nn_test = {N_TEST}\n'
        + ("streaming = true\n" if streaming else "")
        + "\n"
        '[[scores]]\nname = "Softmax"\n\n'
        '[[scores]]\nname = "KNN"\nlayers = ["1-11"]\nparams = {k = 15}\n\n'
        '[[scores]]\nname = "DeepMahalanobis"\nlayers = ["1-11"]\n\n'
        '[[scores]]\nname = "Gram"\nlayers = ["1-5", "1-11", "1-12"]\n\n'
        '[[scenarios]]\nkind = "vertical_flip"\n\n[[scenarios]]\ndataset = "mnist"\n'
    )


def bare_forward_seconds(npz: Path, n_images: int) -> float:
    """Seconds of batched no-grad forward passes of ``tiniest`` over ``n_images`` images."""
    import torch

    from ood_core.hub import load_model

    net = load_model("bundled", "tiniest").eval()
    x = torch.from_numpy(np.load(npz)["images"][:n_images]).float() / 255
    t0 = time.perf_counter()
    with torch.no_grad():
        for k in range(0, len(x), 256):
            net(x[k : k + 256])
    return time.perf_counter() - t0


def one(n_calibration: int, streaming: bool = False) -> dict:
    """One run in this process: the CLI on the workload, then its figures."""
    import pandas as pd
    import torch

    from ood_core.cli import main

    torch.set_num_threads(2)
    npz = build_npz()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "run.toml"
        source = build_parquet() if streaming else npz
        cfg.write_text(config_text(source, n_calibration, streaming))
        t0 = time.perf_counter()
        code = main(["run", str(cfg), "--out", str(Path(tmp) / "out"), "--quiet"])
        wall = time.perf_counter() - t0
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
        if code != 0:
            return {"n_calibration": n_calibration, "exit_code": code}
        info = json.loads((Path(tmp) / "out" / "run.json").read_text())
        metrics = pd.read_csv(Path(tmp) / "out" / "metrics.csv")
    ops = info["timings"]["operations"]
    shared: dict[str, float] = {}
    own: dict[str, float] = {}
    for op in ops:
        shared[op["operation"]] = shared.get(op["operation"], 0.0) + op["shared_seconds"]
        own[op["score"]] = own.get(op["score"], 0.0) + op["seconds"] - op["shared_seconds"]
    auc = metrics[metrics["metric"] == "AUC()"] if "AUC()" in set(metrics["metric"]) else metrics
    n_images = n_calibration + 3 * N_TEST  # calibration, InD test, its flip, MNIST
    bare = bare_forward_seconds(npz, min(n_images, 60000))
    aurocs = {
        f"{r.score} | {r.ood} | {r.metric}": float(r.value) for r in auc.itertuples(index=False)
    }
    gram_calibration = sum(
        op["seconds"] - op["shared_seconds"]
        for op in ops
        if op["score"].startswith("Gram") and op["operation"] == "calibration"
    )
    out = {
        "n_calibration": n_calibration,
        "peak_rss_gb": round(peak_gb, 3),
        "wall_seconds": round(wall, 2),
        "shared_forward_seconds": {k: round(v, 2) for k, v in shared.items()},
        "own_seconds": {k: round(v, 2) for k, v in own.items()},
        "bare_forward_seconds": round(bare, 2),
        "wall_over_bare_forward": round(wall / bare, 2),
        "gram_calibration_over_forward": round(
            gram_calibration / max(shared.get("calibration", 0.0), 1e-9), 2
        ),
        "metrics": aurocs,
    }
    if n_calibration == 5000:  # noqa: PLR2004
        out["max_abs_dauroc_vs_baseline"] = max(
            abs(aurocs[k] - v) for k, v in BASELINE_AUROC_5K.items()
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="*", default=[5000, 20000, 50000])
    parser.add_argument("--json", action="store_true", help="print one JSON object per size")
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="read the images from a parquet file with [data] streaming = true",
    )
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size in-process
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.streaming)))
        return
    build_parquet() if args.streaming else build_npz()
    for n in args.n:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                str(n),
                *(["--streaming"] if args.streaming else []),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            sys.exit(out.returncode)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        if args.json:
            print(json.dumps(row))
            continue
        print(
            f"n_calibration={n:>6,}  peak RSS {row['peak_rss_gb']:.2f} GB  wall "
            f"{row['wall_seconds']:.1f} s  bare forward {row['bare_forward_seconds']:.1f} s"
        )
        print("  shared forward:", row["shared_forward_seconds"])
        print("  own time per score:", row["own_seconds"])
        print(
            f"  wall / bare forward {row['wall_over_bare_forward']:.2f}, Gram calibration / "
            f"shared calibration forward {row['gram_calibration_over_forward']:.2f}"
        )
        if "max_abs_dauroc_vs_baseline" in row:
            print(
                f"  max |dAUROC| vs the in-memory baseline: {row['max_abs_dauroc_vs_baseline']:.2e}"
            )


if __name__ == "__main__":
    main()
