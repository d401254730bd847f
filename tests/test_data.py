"""Bundled datasets: offline round trip through HF datasets, shapes, dtypes, counts, checksums."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from ood_core import data


@pytest.mark.parametrize(
    ("name", "split", "n"),
    [
        ("fashion_mnist", "calibration", 5000),
        ("fashion_mnist", "test", 5000),
        ("mnist", "test", 5000),
    ],
)
def test_bundled_split_loads_with_right_shapes_and_counts(name, split, n):
    ds = data.load_bundled(name, split)
    manifest = data.bundled_checksums()[data.BUNDLED[name]["splits"][split]]
    assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
    assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0
    assert ds.images.max() == 1.0  # uint8 255 maps to exactly 1
    assert len(ds.class_names) == 10
    assert torch.bincount(ds.labels, minlength=10).tolist() == manifest["label_counts"]
    assert manifest["rows"] == n


def test_checksums_match_shipped_files():
    for rel, info in data.bundled_checksums().items():
        assert hashlib.sha256((data.DATA_DIR / rel).read_bytes()).hexdigest() == info["sha256"], rel


def test_class_names_travel_in_the_parquet(fmnist_test, mnist):
    assert (
        fmnist_test.class_names[0] == "T-shirt/top" and fmnist_test.class_names[9] == "Ankle boot"
    )
    assert mnist.class_names == [str(i) for i in range(10)]


def test_fashion_mnist_pixels_are_real_images(fmnist_test, mnist):
    # Fashion-MNIST mean intensity is ~0.286, MNIST's ~0.13: real data, not noise.
    assert abs(fmnist_test.images.mean().item() - 0.286) < 0.01
    assert abs(mnist.images.mean().item() - 0.13) < 0.01


def test_subset_is_deterministic(fmnist_test):
    a, b, c = (
        fmnist_test.subset(100, seed=1),
        fmnist_test.subset(100, seed=1),
        fmnist_test.subset(100, seed=2),
    )
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert len(a) == 100 and fmnist_test.subset(None) is fmnist_test


def test_local_npz_and_parquet_round_trip(tmp_path, mnist):
    x = (mnist.images[:20, 0] * 255).round().to(torch.uint8).numpy()
    y = mnist.labels[:20].numpy()
    np.savez(tmp_path / "d.npz", images=x, labels=y)
    ds = data.load(str(tmp_path / "d.npz"))
    torch.testing.assert_close(ds.images, mnist.images[:20])
    assert ds.labels.tolist() == y.tolist()


def test_clear_errors():
    with pytest.raises(data.DataUnavailableError, match="No bundled dataset 'cifar'"):
        data.load_bundled("cifar")
    with pytest.raises(data.DataUnavailableError, match="no split 'train'"):
        data.load_bundled("mnist", "train")
    with pytest.raises(data.DataUnavailableError, match="No such file"):
        data.load("missing.parquet")


def test_hub_dataset_offline_fails_fast_with_clear_message(monkeypatch):
    import time

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(data.DataUnavailableError, match="ego-thales/cifar10.*no network"):
        data.load_hub("ego-thales/cifar10", "calibration", "unique_split")
    assert time.perf_counter() - t0 < 10


def test_split_disjoint_draws_non_overlapping_subsets(mnist):
    a, b = mnist.subset(100, seed=0).split_disjoint(60, 30, seed=3)
    assert len(a) == 60 and len(b) == 30
    flat_a = {tuple(x.flatten().tolist()) for x in a.images}
    assert not any(tuple(x.flatten().tolist()) in flat_a for x in b.images)
    with pytest.raises(ValueError, match="cannot draw disjoint subsets of 80 and 30"):
        mnist.subset(100, seed=0).split_disjoint(80, 30)
