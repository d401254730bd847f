"""README's "Beyond the reference" table: AUROC Fashion-MNIST vs MNIST (and vs vertical flip) of
each opt-in improvement against the reference default, on the parity inputs (bundled `tiniest`,
1,000 calibration images, 500 InD test vs 500 MNIST / flipped images).

    python benchmarks/beyond_reference.py          # prints a markdown table
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from ood_core.layer_ids import layers_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "parity"))
import harness  # noqa: E402

# (score, layers, reference-default params, opt-in params)
ROWS = [
    ("DeepMahalanobis", [(1, 10), (1, 11)], {}, {"pooling": "mean"}),
    ("DeepMahalanobis", [(1, 10), (1, 11)], {}, {"inverse": "pinv"}),
    ("DeepMahalanobis", [(1, 11)], {}, {"readout": "closest"}),
    ("RelativeMahalanobis", [(1, 11)], {}, {"readout": "closest"}),
    ("Gram", [(1, 5), (1, 11), (1, 12)], {}, {"class_fallback": "pooled"}),
    (
        "Gram",
        [(1, 5), (1, 10)],
        {"act_norm": 2.0, "max_gram_order": 16},
        {"act_norm": 2.0, "max_gram_order": 16, "precision": "float64"},
    ),
    ("DkNN", [(1, 10), (1, 11)], {"k": 15}, {"k": 15, "pooling": "mean"}),
    (
        "DkNN",
        [(1, 11)],
        {"k": 15, "per_class": True},
        {"k": 15, "per_class": True, "statistic": "raw"},
    ),
    (
        "JTLA",
        [(1, 10), (1, 11)],
        {"test": {"type": "multinomial", "mode": "mle", "k": 15}},
        {"test": {"type": "multinomial", "mode": "mle", "k": 15}, "pvalues": "conformal"},
    ),
    ("LID", [(1, 11)], {"k": 15}, {"k": 15, "duplicates": "skip"}),
    ("IsoMax", [], {"n_steps": 200}, {"n_steps": 200, "init": "class_means"}),
    (
        "FeatureSqueezing",
        [],
        {"squeezers": ["bits:4", "median:2"]},
        {"squeezers": ["bits:4", "median:2"], "squeezer_style": "paper"},
    ),
    (
        "Odds",
        [],
        {"epsilon": 0.05, "noise_samples": 16},
        {
            "epsilon": 0.05,
            "noise_samples": 16,
            "noise": "gaussian",
            "two_sided": True,
            "z_scale": "std",
        },
    ),
    ("ReAct", [(1, 11)], {"percentile": 90.0}, {"percentile": 90.0, "output": "energy"}),
]


def aurocs(net, inputs, name, layers, params):
    case = {"key": name, "score": name, "params": params, "layers": [list(x) for x in layers]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = harness.run_case(net, case, inputs, ("ind", "vflip", "darker", "mnist"))
    return harness.auroc(out["ind"], out["mnist"]), harness.auroc(out["ind"], out["vflip"])


def main() -> None:
    from ood_core.hub import load_model

    torch.set_num_threads(2)
    net = load_model("bundled", "tiniest")
    inputs = harness.load_inputs()
    print(
        "| score @ layers | opt-in | AUROC vs MNIST: reference default -> opt-in | vs vertical flip |"
    )
    print("|---|---|---|---|")
    for name, layers, default, opt in ROWS:
        m0, f0 = aurocs(net, inputs, name, layers, default)
        m1, f1 = aurocs(net, inputs, name, layers, opt)
        extra = ", ".join(f"{k}={v!r}" for k, v in opt.items() if default.get(k) != v)
        at = layers_text(layers) or "logits"
        print(
            f"| `{name}` @ {at} | `{extra}` | {m0:.3f} -> {m1:.3f} | {f0:.3f} -> {f1:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
