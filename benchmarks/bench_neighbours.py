"""Neighbours beyond RAM (issue #17): KNN's exact search against opt-in approximate faiss indexes.

The workload: the bundled ``tiniest`` on Fashion-MNIST's official 60,000 training images (the
``.npz`` of :mod:`bench_scale`), KNN(k=15) @ 1-11 (the 80-dim pooled features) calibrated on
50,000 of them; InD test: 5,000 other images; OoD: 5,000 bundled MNIST test images and the
vertical flip of the InD test. Per ``index`` (exact, ``'IVF256,Flat'``, ``'HNSW32'``, and two
settings that trade recall for speed) it prints the fit seconds (the score's own: index build,
training and the recall measurement; the shared forward pass excluded), the search seconds (the
three test sets), the recall@15 measured at fit (on calibration queries), the AUROC per OoD set,
the largest |dAUROC| against exact search and, per test set, the fraction of samples whose 15-th
distance is the exact one (the recall that matters: OoD queries lie far from the bank). The target: an IVF with recall@15 >= 0.99 moves no AUROC by more than
0.002. No figure is asserted: timings depend on the machine (run it alone).

Set-up: ``apt-get install dataset-fashion-mnist`` (the script builds the ``.npz`` when missing)::

    .venv/bin/python benchmarks/bench_neighbours.py
    .venv/bin/python benchmarks/bench_neighbours.py --n-calibration 20000 --index exact HNSW32:64
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scale  # noqa: E402  (the .npz of the scale benchmark)

from ood_core.data import load_bundled  # noqa: E402
from ood_core.diagnostics import OodLensWarning  # noqa: E402
from ood_core.evaluation import Evaluation  # noqa: E402
from ood_core.hub import load_model  # noqa: E402
from ood_core.metrics import AUC  # noqa: E402
from ood_core.scores import KNN  # noqa: E402

LAYER = (1, 11)
K = 15
N_TEST = 5000
DEFAULT_INDEXES = ("exact", "IVF256,Flat", "HNSW32", "IVF256,Flat:4", "HNSW32:64")
"""``index`` or ``index:nprobe`` (default nprobe 16; for HNSW it sets efSearch)."""


def parse(spec: str) -> dict:
    index, _, nprobe = spec.partition(":")
    return {"index": index, **({"nprobe": int(nprobe)} if nprobe else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-calibration", type=int, default=50_000)
    parser.add_argument("--index", nargs="*", default=list(DEFAULT_INDEXES))
    args = parser.parse_args()
    torch.set_num_threads(2)
    npz = bench_scale.build_npz()
    images = torch.from_numpy(np.load(npz)["images"])
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    n_cal = args.n_calibration
    if n_cal + N_TEST > len(images):
        sys.exit(f"--n-calibration must be <= {len(images) - N_TEST:,}")
    calib = images[order[:n_cal]].float() / 255
    ind = images[order[n_cal : n_cal + N_TEST]].float() / 255
    oods = {
        "mnist": load_bundled("mnist", "test").images[:N_TEST],
        "vertical_flip": ind.flip(-2),
    }
    net = load_model("bundled", "tiniest").eval()
    print(
        f"KNN(k={K}) @ 1-11 on tiniest: {n_cal:,} Fashion-MNIST calibration images, "
        f"{N_TEST:,} InD test, OoD: " + ", ".join(f"{k} ({len(v):,})" for k, v in oods.items())
    )
    header = (
        f"{'index':<22} {'fit s':>7} {'search s':>9} {'recall@15':>10} "
        + " ".join(f"{'AUROC ' + k:>20}" for k in oods)
        + f" {'max |dAUROC|':>13}  kth exact ind/"
        + "/".join(oods)
    )
    print(header)
    print("-" * len(header))
    exact_auc: dict[str, float] | None = None
    exact_confs: dict[str, np.ndarray] = {}
    for spec in args.index:
        score = KNN(k=K, **parse(spec))
        score.layers = (LAYER,)
        ev = Evaluation.for_net(net, calib[:1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OodLensWarning)  # low recall: shown in the table
            ev.fit([score], calib)
        fit_s = score.timer.entries[-1][2] - ev.last_shared_seconds[0]
        search_s = 0.0
        confs = {}
        for name, x in {"ind": ind, **oods}.items():
            _, c = ev.predicted([score], x)
            search_s += score.timer.entries[-1][2] - ev.last_shared_seconds[0]
            confs[name] = c[0].numpy()
        auc = {name: AUC()(confs["ind"], confs[name]) for name in oods}
        if exact_auc is None and score.index_spec_ == "exact":
            exact_auc, exact_confs = auc, confs
        same = {  # test samples whose 15-th distance is the exact one (float32 rounding apart)
            n: float(np.isclose(c, exact_confs[n], rtol=1e-4, atol=1e-6).mean()) if exact_auc else 0
            for n, c in confs.items()
        }
        delta = max(abs(auc[n] - exact_auc[n]) for n in oods) if exact_auc else float("nan")
        recall = "exact" if score.recall_ is None else f"{score.recall_:.4f}"
        print(
            f"{spec:<22} {fit_s:>7.2f} {search_s:>9.2f} {recall:>10} "
            + " ".join(f"{auc[n]:>20.4f}" for n in oods)
            + f" {delta:>13.4f}  "
            + "/".join(f"{same[n]:.3f}" for n in confs)
        )
        for note in score.fit_notes:
            print(f"    note: {note}")
        for message in score.fit_warnings:
            print(f"    warning: {message}")


if __name__ == "__main__":
    main()
