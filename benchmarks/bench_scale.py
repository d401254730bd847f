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


def config_text(npz: Path, n_calibration: int) -> str:
    return (
        '[model]\nrepo = "bundled"\nentry = "tiniest"\n\n'
        f'[data]\nind_dataset = "{npz}"\nn_calibration = {n_calibration}\nn_test = {N_TEST}\n\n'
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


def one(n_calibration: int) -> dict:
    """One run in this process: the CLI on the workload, then its figures."""
    import pandas as pd
    import torch

    from ood_core.cli import main

    torch.set_num_threads(2)
    npz = build_npz()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "run.toml"
        cfg.write_text(config_text(npz, n_calibration))
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
    return {
        "n_calibration": n_calibration,
        "peak_rss_gb": round(peak_gb, 3),
        "wall_seconds": round(wall, 2),
        "shared_forward_seconds": {k: round(v, 2) for k, v in shared.items()},
        "own_seconds": {k: round(v, 2) for k, v in own.items()},
        "bare_forward_seconds": round(bare_forward_seconds(npz, min(n_images, 60000)), 2),
        "metrics": {
            f"{r.score} | {r.ood} | {r.metric}": float(r.value) for r in auc.itertuples(index=False)
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="*", default=[5000, 20000, 50000])
    parser.add_argument("--json", action="store_true", help="print one JSON object per size")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size in-process
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one)))
        return
    build_npz()
    for n in args.n:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, check=False
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


if __name__ == "__main__":
    main()
