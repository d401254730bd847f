"""Which score runs on which real architecture (issue #16): a markdown table, one row per score.

The architectures and data of ``tests/test_real_architectures.py`` (torchvision ``resnet18``, timm
``convnext_atto``, a timm ViT at 32 px with patch 4 and timm's two-head DeiT-distilled, randomly
initialised; 96 bundled Fashion-MNIST calibration images and 48 test / 48 MNIST images at 3x32x32).
Each score is fitted alone at its default layers; a cell is the AUROC (Fashion-MNIST vs MNIST,
random weights: only "it runs and ranks" matters here), ``refused: <message>`` when it refuses
before computing, ``warned`` when its fit or confidences raised an OodLensWarning, or the error
it failed with (none expected)::

    .venv/bin/python benchmarks/architecture_table.py > /tmp/arch.md
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from test_real_architectures import ARCHS, make, score  # noqa: E402

from ood_core import eval as ev  # noqa: E402
from ood_core.data import load_bundled  # noqa: E402
from ood_core.diagnostics import OodLensWarning  # noqa: E402
from ood_core.metrics import AUC  # noqa: E402
from ood_core.recorder import Recorder  # noqa: E402
from ood_core.scores import SCORES  # noqa: E402


def _images() -> dict[str, torch.Tensor]:
    import torch.nn.functional as F

    def rgb32(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=32, mode="bilinear").clamp(0, 1).repeat(1, 3, 1, 1)

    calib = load_bundled("fashion_mnist", "calibration")
    return {
        "calib": rgb32(calib.images[:96]),
        "labels": calib.labels[:96],
        "test": rgb32(load_bundled("fashion_mnist", "test").images[:48]),
        "ood": rgb32(load_bundled("mnist", "test").images[:48]),
    }


def cell(name: str, rec: Recorder, images: dict[str, torch.Tensor]) -> str:
    s = score(name, rec)
    layers = type(s).default_layers(rec)
    where = ", ".join(rec.layer_name(lid) for lid in layers) or "-"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fitted = ev.fit_scores(
                [(s, layers)], rec, images["calib"], images["labels"], progress=False
            )
            ind, (ood,) = ev.compute_confidence(
                fitted, images["test"], [images["ood"]], progress=False
            )
        except ValueError as exc:
            return f"refused: {str(exc).splitlines()[0][:110]}"
    auc = float(AUC()(ind[0], ood[0]))
    said = [w for w in caught if issubclass(w.category, OodLensWarning)]
    return f"{auc:.2f} @ {where}" + (" (warned)" if said else "")


def main() -> None:
    images = _images()
    nets = {arch: make(arch) for arch in ARCHS}
    recs = {a: Recorder(n, input_data=images["calib"][:1]) for a, n in nets.items()}
    print("| score | " + " | ".join(ARCHS) + " |")
    print("|---|" + "---|" * len(ARCHS))
    for name in SCORES:
        cells = [cell(name, recs[a], images).replace("|", "/") for a in ARCHS]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
