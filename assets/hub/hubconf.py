"""Local torch.hub repository of the models bundled with ood-lens.

Load with ``torch.hub.load("assets/hub", "tiniest", source="local")``. Every entry point returns a
classifier in eval mode that takes float images in [0, 1] of shape ``(N, 1, 28, 28)`` (normalising
internally) and returns ``(N, 10)`` Fashion-MNIST logits. Each model carries an ``ood_lens``
attribute: input shape, class names, normalisation, recorded test accuracy.
"""

import json
from pathlib import Path

import torch

dependencies = ["torch"]

_HERE = Path(__file__).resolve().parent
FMNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _build(name: str, pretrained: bool) -> torch.nn.Module:
    import sys

    if str(_HERE) not in sys.path:
        sys.path.insert(0, str(_HERE))
    from fmnist_nets import ARCHITECTURES

    net = ARCHITECTURES[name]()
    record = json.loads((_HERE / "models.json").read_text()).get(name, {})
    if pretrained:
        state = torch.load(_HERE / "weights" / f"{name}.pt", map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    net.ood_lens = {
        "input_shape": (1, 28, 28),
        "class_names": FMNIST_CLASSES,
        "dataset": "fashion_mnist",
        "normalisation": "internal (inputs in [0, 1])",
        "test_accuracy": record.get("test_accuracy") if pretrained else None,
    }
    return net.eval()


def tiniest(pretrained: bool = True) -> torch.nn.Module:
    """ConvNeXt-like net (~89k parameters, LayerNorm blocks) trained on Fashion-MNIST.

    conv stem -> LayerNorm2d -> 3 blocks (48 ch, 14x14) -> stride-2 conv -> 3 blocks (80 ch, 7x7)
    -> average pool -> linear. Layer table resembles the reference library's ``tiniest``.
    """
    return _build("tiniest", pretrained)


def resnet_small(pretrained: bool = True) -> torch.nn.Module:
    """Small ResNet (~78k parameters, BatchNorm, 3 stages of one basic block) on Fashion-MNIST."""
    return _build("resnet_small", pretrained)
