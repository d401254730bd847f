"""Sanity check on real data: every registered score on the bundled model, Fashion-MNIST test vs
MNIST digits (and vs a vertical flip), AUROC and FPR@95TPR. Prints a markdown table.

Each score uses its suggested layers (``Score.suggest_layers``) and, for required parameters, the
suggested value in its declaration. All scores share one forward pass per dataset.

Run: ``.venv/bin/python benchmarks/sanity_auroc.py [--entry tiniest] [--n 1000]``
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OOD_LENS_QUIET", "1")

from ood_core.data import load_bundled  # noqa: E402
from ood_core.engine import Engine  # noqa: E402
from ood_core.eval import compute_confidence, compute_metrics, fit_scores  # noqa: E402
from ood_core.hub import load_model  # noqa: E402
from ood_core.metrics import AUC, TNR  # noqa: E402
from ood_core.perturbations import make_perturbation  # noqa: E402
from ood_core.report import layers_text  # noqa: E402
from ood_core.scores import SCORES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entry", default="tiniest")
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    net = load_model("bundled", args.entry)
    calib = load_bundled("fashion_mnist", "calibration").subset(args.n, seed=0)
    ind = load_bundled("fashion_mnist", "test").subset(args.n, seed=1).images
    mnist = load_bundled("mnist", "test").subset(args.n, seed=2).images
    flip = make_perturbation("vertical_flip")(ind)
    rec = Engine.for_net(net, calib.images).recorder
    pairs = []
    for cls in SCORES.values():
        params = {p.name: p.default for p in cls.params if p.required}
        score = cls(**params)
        layers = score.check_layers(cls.suggest_layers(rec), rec)
        pairs.append((score, list(layers)))
    t0 = time.perf_counter()
    fitted = fit_scores(pairs, net, calib.images, calib.labels, progress=False)
    ci, co = compute_confidence(fitted, ind=ind, oods=(mnist, flip), progress=False)
    seconds = time.perf_counter() - t0
    metrics = (AUC(), TNR(min_tpr=0.95))
    evals = compute_metrics(ci, co, metrics, score_names=[repr(s) for s, _ in pairs])
    print(
        f"{args.entry}: {args.n} calibration, {args.n} Fashion-MNIST test vs {args.n} MNIST / "
        f"vertical flip; {len(pairs)} scores in {seconds:.1f} s\n"
    )
    print(
        "| score | family | layers | AUROC vs MNIST | FPR@95TPR vs MNIST | AUROC vs vertical flip |"
    )
    print("|---|---|---|---|---|---|")
    for (score, layers), e in zip(pairs, evals, strict=True):
        print(
            f"| `{score!r}` | {type(score).family} | {layers_text(layers) or 'logits'} | "
            f"{e[0, 0]:.3f} | {1 - e[0, 1]:.3f} | {e[1, 0]:.3f} |"
        )


if __name__ == "__main__":
    main()
