"""Shared fixtures: the bundled model and data, loaded once per session (offline)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# the dashboard's run store: never the user's ~/.cache during tests
os.environ.setdefault("OOD_LENS_RUNS", tempfile.mkdtemp(prefix="ood-lens-runs-"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def fmnist_test():
    from ood_core.data import load_bundled

    return load_bundled("fashion_mnist", "test")


@pytest.fixture(scope="session")
def fmnist_calib():
    from ood_core.data import load_bundled

    return load_bundled("fashion_mnist", "calibration")


@pytest.fixture(scope="session")
def mnist():
    from ood_core.data import load_bundled

    return load_bundled("mnist", "test")


@pytest.fixture(scope="session")
def tiniest():
    from ood_core.hub import load_model

    return load_model("bundled", "tiniest")


class TinyConv(nn.Module):
    """The shared small network of the score tests: conv(1->4) -> relu -> avgpool -> flatten ->
    linear(4->3); ids: 1-1 conv, 1-2 relu, 1-3 pool, 1-4 flatten, 1-5 fc. ``calls`` counts
    forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(self.flat(self.pool(self.relu(self.conv(x)))))

    def relu_features(self, x):
        """The pooled ReLU features ``(n, 4)`` in float64 (what the fc layer reads)."""
        return self.relu(self.conv(x)).mean((2, 3)).double()


@pytest.fixture()
def net():
    """A fresh :class:`TinyConv` (seed 0) in eval mode (test modules may define their own)."""
    torch.manual_seed(0)
    return TinyConv().eval()


@pytest.fixture()
def data():
    """60 random 1x6x6 images in [0, 1] and labels in {0, 1, 2}, seeded."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(60, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (60,), generator=g)
    return x, y


def fit_one(net, score, layers, x_fit, y_fit, x, input_range=None):
    """Fit ``score`` on ``layers`` of ``net`` and return ``(logits, conformity)`` on ``x``
    (inputs checked against ``input_range``: None, [0, 1] for these undeclared nets)."""
    from ood_core.evaluation import Evaluation

    score.layers = tuple(layers)
    ev = Evaluation.for_net(net, x_fit, input_range=input_range)
    ev.fit([score], x_fit, y_fit)
    ((logits, conf),) = ev.confidences([score], x)
    return logits, conf


@contextlib.contextmanager
def server_address(address: str | None) -> Iterator[None]:
    """Streamlit's ``server.address`` set to ``address`` for the block (AppTest reads it)."""
    from streamlit import config as st_config

    old = st_config.get_option("server.address")
    st_config.set_option("server.address", address)
    try:
        yield
    finally:
        st_config.set_option("server.address", old)
