"""Shared fixtures: the bundled model and data, loaded once per session (offline)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
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
