"""Model hub: bundled local torch.hub repo, accuracy records, offline GitHub errors."""

from __future__ import annotations

import time

import pytest
import torch

from ood_core import hub


def test_bundled_entries_are_listed_with_docs():
    entries = {e["name"]: e["doc"] for e in hub.list_entries("bundled")}
    assert {"tiniest", "resnet_small"} <= set(entries)
    assert "ConvNeXt" in entries["tiniest"]


def test_bundled_repo_loads_through_plain_torch_hub():
    net = torch.hub.load(str(hub.BUNDLED_HUB), "tiniest", source="local", trust_repo=True)
    assert not net.training
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("entry", ["tiniest", "resnet_small"])
def test_bundled_model_reaches_recorded_accuracy(entry, fmnist_test):
    net = hub.load_model("bundled", entry)
    info = hub.model_info(net, entry)
    record = hub.bundled_records()[entry]
    assert info.input_shape == (1, 28, 28) and len(info.class_names) == 10
    with torch.no_grad():
        pred = torch.cat([net(x).argmax(1) for x in fmnist_test.images.split(1000)])
    acc = (pred == fmnist_test.labels).float().mean().item()
    assert record["test_accuracy"] >= 0.90
    assert acc == pytest.approx(record["test_accuracy"], abs=0.005)
    assert info.test_accuracy == record["test_accuracy"]


def test_unknown_entry_lists_the_available_ones():
    with pytest.raises(hub.HubUnavailableError, match="Available entry points: .*tiniest"):
        hub.load_model("bundled", "resnet9000")


def test_github_repo_offline_fails_fast_with_clear_message(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # nothing cached
    t0 = time.perf_counter()
    with pytest.raises(hub.HubUnavailableError, match="ood-lens-tests/no-such-repo"):
        hub.load_model("ood-lens-tests/no-such-repo:main", "tiniest", timeout=3)
    assert time.perf_counter() - t0 < 10


def test_bad_reference_is_explained():
    with pytest.raises(hub.HubUnavailableError, match="neither 'bundled'"):
        hub.load_model("not a repo", "x")


def test_incompatible_data_gives_actionable_message(tiniest):
    with pytest.raises(ValueError, match=r"expects inputs of shape \(1, 28, 28\).*\(3, 32, 32\)"):
        hub.check_compatible(tiniest, (3, 32, 32), name="tiniest")
    hub.check_compatible(tiniest, (1, 28, 28), 10)
