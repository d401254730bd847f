"""Model hub: bundled local torch.hub repo, accuracy records, offline GitHub errors, trust."""

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
        hub.load_model("ood-lens-tests/no-such-repo:main", "tiniest", trust_repo=True, timeout=3)
    assert time.perf_counter() - t0 < 10


def test_bad_reference_is_explained():
    with pytest.raises(hub.HubUnavailableError, match="neither 'bundled'"):
        hub.load_model("not a repo", "x")


def test_incompatible_data_gives_actionable_message(tiniest):
    with pytest.raises(ValueError, match=r"expects inputs of shape \(1, 28, 28\).*\(3, 32, 32\)"):
        hub.check_compatible(tiniest, (3, 32, 32), name="tiniest")
    hub.check_compatible(tiniest, (1, 28, 28), 10)


HUBCONF = """
import pathlib
import torch

pathlib.Path(__file__).with_name("imported.marker").touch()


def small(n_classes=3):
    \"\"\"A linear model on 1x4x4 inputs.\"\"\"
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, n_classes))
    net.ood_lens = {"input_shape": (1, 4, 4)}
    return net
"""


def _hub_dir(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "hubconf.py").write_text(HUBCONF)
    return root


def test_untrusted_local_hub_is_refused_before_its_code_runs(tmp_path):
    repo = _hub_dir(tmp_path / "myhub")
    for call in (lambda: hub.load_model(str(repo), "small"), lambda: hub.list_entries(repo)):
        with pytest.raises(hub.UntrustedRepoError) as err:
            call()
        msg = str(err.value)
        assert str(repo) in msg and "--trust-repo" in msg and "trust_repo = true" in msg
        assert err.value.repo == str(repo)
    assert not (repo / "imported.marker").exists()


def test_trusted_local_hub_loads_and_lists(tmp_path):
    repo = _hub_dir(tmp_path / "myhub")
    entries = hub.list_entries(str(repo), trust_repo=True)
    assert entries == [{"name": "small", "doc": "A linear model on 1x4x4 inputs."}]
    net = hub.load_model(str(repo), "small", trust_repo=True, n_classes=5)
    assert not net.training and net(torch.rand(2, 1, 4, 4)).shape == (2, 5)
    assert hub.model_info(net).input_shape == (1, 4, 4)
    assert (repo / "imported.marker").exists()


def test_untrusted_github_repo_is_refused_without_touching_network_or_cache(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("the network must not be tried for an untrusted repo")

    monkeypatch.setattr(hub, "network_available", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cached = _hub_dir(tmp_path / "someone_models_main")  # as torch.hub caches owner/repo:main
    for repo in ("someone/models", "someone/models:main"):
        with pytest.raises(hub.UntrustedRepoError, match=f"'{repo}'.*--trust-repo"):
            hub.load_model(repo, "small")
        with pytest.raises(hub.UntrustedRepoError, match=f"'{repo}'"):
            hub.list_entries(repo)
    assert not (cached / "imported.marker").exists()
    # trusted, the cached copy is used (still offline)
    net = hub.load_model("someone/models", "small", trust_repo=True)
    assert net(torch.rand(1, 1, 4, 4)).shape == (1, 3)


def test_bundled_repo_is_trusted_by_name_and_by_path():
    assert hub.is_bundled("bundled") and hub.is_bundled(hub.BUNDLED_HUB)
    assert hub.is_bundled(str(hub.BUNDLED_HUB / ".." / "hub"))
    assert not hub.is_bundled("owner/repo") and not hub.is_bundled(hub.BUNDLED_HUB.parent)
    assert {e["name"] for e in hub.list_entries(str(hub.BUNDLED_HUB))} >= {"tiniest"}
    assert hub.repo_kind("bundled") == "bundled" and hub.repo_kind("a/b") == "github"
    assert hub.repo_kind(str(hub.BUNDLED_HUB.parent)) == "local"
