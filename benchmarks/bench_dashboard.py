"""Time of the dashboard's Run on the bundled default (what the Run button calls).

The seed's four scores (Softmax, GradNorm, Gram, KNN) and three scenarios (vertical flip, darker,
uniform noise), 1,000 calibration / 1,000 InD, in one process with one run cache:

* ``first_run_s``: the first Run (model and data loading included, empty caches);
* ``one_param_s``: after changing KNN's ``k`` (KNN refitted and rescored from cached activations,
  no forward pass);
* ``add_score_s``: after adding Energy (it reads the cached logits: no forward pass);
* ``cached_s``: nothing changed (everything from the cache).

Run: ``.venv/bin/python benchmarks/bench_dashboard.py [--json]``. Measure alone on the machine:
parallel jobs on 2 cores distort timings several-fold.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OOD_LENS_QUIET", "1")

from ood_core.config import ScoreSpec, example_config  # noqa: E402
from ood_core.runner import RunCache, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    cfg = example_config()
    cfg.scenarios = cfg.scenarios[:3]  # the seed's three perturbations
    cache = RunCache()

    def timed() -> float:
        t0 = time.perf_counter()
        run(cfg, cache)
        return time.perf_counter() - t0

    first = timed()
    forward_before = cache.features.misses
    cfg.scores[3].params["k"] = 20
    one_param = timed()
    cfg.scores.append(ScoreSpec("Energy"))
    add_score = timed()
    cached = timed()
    figures = {
        "first_run_s": round(first, 3),
        "one_param_s": round(one_param, 3),
        "add_score_s": round(add_score, 3),
        "cached_s": round(cached, 3),
        "one_param_pct_of_first": round(100 * one_param / first, 1),
        "add_score_pct_of_first": round(100 * add_score / first, 1),
        "forward_passes_after_first_run": cache.features.misses - forward_before,
    }
    if args.json:
        print(json.dumps(figures))
        return
    print(f"first Run (4 scores, 3 scenarios, 1000/1000): {first:6.2f} s")
    print(
        f"after changing KNN's k:                       {one_param:6.2f} s "
        f"({figures['one_param_pct_of_first']} % of the first)"
    )
    print(
        f"after adding Energy:                          {add_score:6.2f} s "
        f"({figures['add_score_pct_of_first']} % of the first)"
    )
    print(f"nothing changed (all cached):                 {cached:6.2f} s")
    print(
        f"forward passes after the first Run:           {figures['forward_passes_after_first_run']}"
    )


if __name__ == "__main__":
    main()
