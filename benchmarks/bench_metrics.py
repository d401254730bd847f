"""Speed of ROC construction and metrics on large confidence arrays (prints figures).

Run: ``.venv/bin/python benchmarks/bench_metrics.py``
"""

from __future__ import annotations

import time

import numpy as np

from ood_core.metrics import AUC, MCC, ROC, TNR, TPR, bootstrap


def main() -> None:
    rng = np.random.default_rng(0)
    for n in (10_000, 100_000, 1_000_000):
        ind, ood = rng.normal(1, 1, n // 2), rng.normal(0, 1, n // 2)
        t0 = time.perf_counter()
        roc = ROC(ind, ood)
        t1 = time.perf_counter()
        values = [
            m.from_roc(roc)
            for m in (AUC(), AUC(kind="convex_hull"), TPR(max_fpr=0.05), TNR(min_tpr=0.95), MCC())
        ]
        t2 = time.perf_counter()
        print(
            f"n={n:>9,d}  ROC {1e3 * (t1 - t0):7.1f} ms   5 metrics {1e3 * (t2 - t1):7.1f} ms   "
            f"AUROC {values[0]:.4f}"
        )
    ind, ood = rng.normal(1, 1, 1000), rng.normal(0, 1, 1000)
    t0 = time.perf_counter()
    res = bootstrap(AUC(), ind, ood, n_boot=1000)
    print(
        f"bootstrap AUROC, 1000+1000 samples, 1000 resamples: {time.perf_counter() - t0:.2f} s "
        f"-> {res.value:.4f} [{res.low:.4f}, {res.high:.4f}]"
    )


if __name__ == "__main__":
    main()
