"""Time of the dashboard's Run on the bundled default (what the Run button calls).

The seed's four scores (Softmax, GradNorm, Gram, KNN) and three scenarios (vertical flip, darker,
uniform noise), 1,000 calibration / 1,000 InD: the first Run (model and data loading included,
empty cache), a re-run after changing one score's parameter (only that score is recomputed), and
a re-run with nothing changed (everything from the cache).

Run: ``.venv/bin/python benchmarks/bench_dashboard.py``
"""

from __future__ import annotations

import time

from ood_core.pipeline import RunCache, example_config, run


def main() -> None:
    cfg = example_config()
    cfg.scenarios = cfg.scenarios[:3]  # the seed's three perturbations
    cache = RunCache()
    t0 = time.perf_counter()
    run(cfg, cache)
    first = time.perf_counter() - t0
    cfg.scores[3].params["k"] = 20
    t0 = time.perf_counter()
    run(cfg, cache)
    one_param = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(cfg, cache)
    cached = time.perf_counter() - t0
    print(f"first Run (4 scores, 3 scenarios, 1000/1000): {first:6.1f} s")
    print(f"after changing KNN's k:                       {one_param:6.1f} s")
    print(f"nothing changed (all cached):                 {cached:6.1f} s")


if __name__ == "__main__":
    main()
