"""Executor benchmark (issue #18): the scale workload on the local executor and on Ray.

The workload is :mod:`bench_scale`'s (bundled ``tiniest``, Fashion-MNIST's 60k training images as
one ``.npz``, Softmax, KNN @ 1-11, DeepMahalanobis @ 1-11, Gram @ 1-5, 1-11, 1-12, vertical flip
and MNIST, 5,000 test images) at ``--n`` calibration samples (20,000 by default), run by the CLI
in a fresh process per executor: ``local``, then ``ray`` with 1 and 2 workers (a local Ray
started by the run). Per executor it prints the wall time, Ray's start-up (from the run's
``run.json``), the peak memory of the whole process tree (the sum of every process's PSS, read
from ``/proc`` every 0.2 s: Ray's raylet, object store and workers included, shared pages counted
once) and the max |difference| of every confidence against the local run (must be <= 1e-6).

Linux only (``/proc``). Run alone on a quiet machine::

    .venv/bin/python benchmarks/bench_executors.py            # n = 20,000
    .venv/bin/python benchmarks/bench_executors.py --n 5000 --json
    .venv/bin/python benchmarks/bench_executors.py --device cuda   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import build_npz, config_text  # noqa: E402

CLI = [sys.executable, "-m", "ood_core.cli"]
EXECUTORS = [("local", 1), ("ray", 1), ("ray", 2)]


def _children() -> dict[int, list[int]]:
    """Every process's children (from ``/proc/*/stat``'s parent pid)."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def _pss_bytes(pid: int) -> int:
    """A process's proportional set size (shared pages divided among their users)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_pss(root: int) -> int:
    """The summed PSS of ``root`` and all its descendants."""
    kids, todo, total = _children(), [root], 0
    while todo:
        pid = todo.pop()
        total += _pss_bytes(pid)
        todo += kids.get(pid, [])
    return total


def one(executor: str, workers: int, n: int, folder: Path, device: str = "cpu") -> dict:
    """One CLI run in a fresh process, its process tree sampled for memory."""
    cfg = folder / f"{executor}-{workers}-{device}.toml"
    cfg.write_text(config_text(build_npz(), n))
    out = folder / f"out-{executor}-{workers}-{device}"
    cmd = [*CLI, "run", str(cfg), "--out", str(out), "--quiet", "--executor", executor]
    cmd += ["--device", device]
    if executor == "ray":
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "RAY_TMPDIR": str(folder / "ray")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    info = json.loads((out / "run.json").read_text())
    return {
        "executor": executor,
        "workers": workers,
        "device": info.get("execution", {}).get("device", device),
        "n_calibration": n,
        "wall_seconds": round(wall, 2),
        "ray_startup_seconds": info.get("execution", {}).get("startup_seconds", 0.0),
        "peak_tree_pss_gb": round(peak[0] / 1e9, 3),
        "out": str(out),
    }


def max_abs_diff(a: Path, b: Path) -> float:
    """The largest |difference| between two bundles' confidences (same rows, same columns)."""
    x = pd.read_parquet(a / "confidences.parquet")
    y = pd.read_parquet(b / "confidences.parquet")
    assert list(x.columns) == list(y.columns) and len(x) == len(y), "different bundles"
    numeric = [c for c in x.columns if pd.api.types.is_float_dtype(x[c])]
    other = [c for c in x.columns if c not in numeric]
    assert x[other].equals(y[other]), "rows in a different order"
    return float(np.max(np.abs(x[numeric].to_numpy() - y[numeric].to_numpy())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="calibration samples")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run")
    parser.add_argument(
        "--device",
        default="cpu",
        help="run every executor on this device (e.g. cuda); the local CPU run is added as the "
        "reference: confidences must equal it within the parity tolerance (1e-5)",
    )
    args = parser.parse_args()
    build_npz()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one(e, w, args.n, Path(tmp), args.device) for e, w in EXECUTORS]
        if args.device != "cpu":
            rows.insert(0, one("local", 1, args.n, Path(tmp), "cpu"))
        local = Path(rows[0]["out"])
        for row in rows:
            row["max_abs_diff_vs_local"] = max_abs_diff(local, Path(row.pop("out")))
    for row in rows:
        if args.json:
            print(json.dumps(row))
            continue
        print(
            f"{row['executor']:>5} x{row['workers']} on {row['device']:<6}  wall {row['wall_seconds']:6.1f} s  Ray "
            f"start-up {row['ray_startup_seconds']:4.1f} s  peak tree PSS "
            f"{row['peak_tree_pss_gb']:.2f} GB  max |diff| vs local "
            f"{row['max_abs_diff_vs_local']:.1e}"
        )
    worst = max(r["max_abs_diff_vs_local"] for r in rows)
    tolerance = 1e-6 if args.device == "cpu" else 1e-5  # the parity tolerance across devices
    if worst > tolerance:
        sys.exit(f"confidences differ from the local CPU run by {worst:.2e} > {tolerance:g}")


if __name__ == "__main__":
    main()
