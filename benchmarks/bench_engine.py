"""Shared single-pass engine vs one pass per score (the reference library's way).

The seed workload on the bundled ``tiniest``: Softmax, GradNorm on the logits layer, Gram on three
layers and KNN on the pooled features; ``--n`` calibration samples, ``--n`` InD test samples and
three OoD sets (vertical flip, darker, uniform noise). Each mode runs in a fresh subprocess so its
peak memory (max RSS; on CUDA also the peak allocated memory) is its own.

* ``shared``: ``eval.fit_scores`` + ``eval.compute_confidence`` — one forward pass per dataset
  feeds every score.
* ``separate``: every score is fitted and run alone (its own forward pass per dataset), GradNorm
  through per-sample gradients (``torch.func``) as the reference library does.

Run: ``.venv/bin/python benchmarks/bench_engine.py [--n 1000] [--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("OOD_LENS_QUIET", "1")


def workload(n: int, device: str):
    from ood_core.data import load_bundled
    from ood_core.hub import load_model
    from ood_core.scores import KNN, GradNorm, Gram, Softmax

    net = load_model("bundled", "tiniest").to(device)
    calib = load_bundled("fashion_mnist", "calibration")
    test = load_bundled("fashion_mnist", "test")
    reps = -(-n // len(calib))  # n above 5,000: tile the shipped subsets
    calib_x = calib.images.repeat(reps, 1, 1, 1)[:n].to(device)
    calib_y = calib.labels.repeat(reps)[:n].to(device)
    ind = test.images.repeat(reps, 1, 1, 1)[:n].to(device)
    g = torch.Generator().manual_seed(0)
    oods = (ind.flip(2), ind * 0.5, torch.rand(ind.shape, generator=g).to(device))
    pairs = (
        (Softmax(), []),
        (GradNorm(), [(1, 12)]),
        (Gram(), [(1, 5), (1, 11), (1, 12)]),
        (KNN(k=int(n**0.4)), [(1, 11)]),
    )
    return net, calib_x, calib_y, ind, oods, pairs


def _per_sample_grads(check_layers):
    """Wrap GradNorm.check_layers so that it always takes the torch.func per-sample path."""

    def wrapped(layers, recorder=None):
        out = check_layers(layers, recorder)
        check_layers.__self__.__dict__["closed_form"] = False
        check_layers.__self__.__dict__["needs_param_grad"] = True
        return out

    return wrapped


def child(mode: str, n: int, device: str, out: str) -> None:
    from ood_core.core import predicted_confidence
    from ood_core.eval import compute_confidence, fit_scores
    from ood_core.evaluation import Evaluation

    net, cx, cy, ind, oods, pairs = workload(n, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    # warm-up (allocators, faiss, kernels) on a few samples, not timed
    fit_scores(pairs, net, cx[:64], cy[:64], progress=False)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    if mode == "shared":
        fitted = fit_scores(pairs, net, cx, cy, progress=False)
        ci, co = compute_confidence(fitted, ind=ind, oods=oods, progress=False)
        confs = [ci.numpy(), *[c.numpy() for c in co]]
    else:
        per_score = []
        for score, layers in pairs:
            score.layers = tuple(layers)
            eng = Evaluation.for_net(net, cx)
            if hasattr(score, "closed_form"):  # the reference differentiates per sample
                score.check_layers = _per_sample_grads(score.check_layers)
            eng.fit([score], cx, cy)
            per_score.append(
                [
                    predicted_confidence(*eng.confidences([score], x)[0]).cpu().numpy()
                    for x in (ind, *oods)
                ]
            )
        confs = [np.stack([s[d] for s in per_score]) for d in range(4)]
    sync()
    seconds = time.perf_counter() - t0
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    np.savez(out, *confs)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "max_rss_mib": rss, "peak_gpu_mib": peak_gpu}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=("shared", "separate"))
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.n, args.device, args.out)
        return
    results, confs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("shared", "separate"):
            out = str(Path(tmp) / f"{mode}.npz")
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    "--n",
                    str(args.n),
                    "--device",
                    args.device,
                    "--out",
                    out,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            with np.load(out) as f:
                confs[mode] = [f[k] for k in sorted(f.files, key=lambda s: int(s.split("_")[1]))]
    pairs = list(zip(confs["shared"], confs["separate"], strict=True))
    abs_diff = max(float(np.max(np.abs(a - b))) for a, b in pairs)
    rel_diff = max(float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b)))) for a, b in pairs)
    s, r = results["shared"], results["separate"]
    print(
        f"workload: Softmax, GradNorm@(1,12), Gram@(1,5),(1,11),(1,12), KNN@(1,11); "
        f"n={args.n} calibration + {args.n} InD + 3 OoD sets; device={args.device}; "
        f"torch threads={torch.get_num_threads()}"
    )
    print(
        f"shared engine : {s['seconds']:7.2f} s   max RSS {s['max_rss_mib']:7.0f} MiB"
        + (f"   peak GPU {s['peak_gpu_mib']:.0f} MiB" if s["peak_gpu_mib"] else "")
    )
    print(
        f"separate      : {r['seconds']:7.2f} s   max RSS {r['max_rss_mib']:7.0f} MiB"
        + (f"   peak GPU {r['peak_gpu_mib']:.0f} MiB" if r["peak_gpu_mib"] else "")
    )
    print(
        f"speed-up      : {r['seconds'] / s['seconds']:.2f}x   confidences: max |diff| "
        f"{abs_diff:.2e}, max |diff| / max(1, |value|) {rel_diff:.2e}"
    )


if __name__ == "__main__":
    main()
