"""Unit tests of ood_lens_app.runs (run with the dashboard's loaded model and data, replay,
export) and ood_lens_app.sources (choosing the model and the InD data), no Streamlit running."""

from __future__ import annotations

import io

import pandas as pd
import pytest
import torch

from ood_core.config import RunConfig, ScenarioSpec, ScoreSpec, example_config
from ood_core.data import DataUnavailableError, ImageDataset
from ood_core.hub import HubUnavailableError
from ood_core.runner import RunCache, run
from ood_lens_app import runs, sources, state


# ---------------------------------------------------------------------------- runs
class _Loaders:
    """Counting stand-ins for the dashboard's cached loaders."""

    def __init__(self, net, data) -> None:
        self.net, self.data, self.calls = net, data, []

    def model(self, repo, entry):
        self.calls.append(("model", repo, entry))
        return self.net

    def dataset(self, source, split, config):
        self.calls.append(("data", source, split, config))
        return self.data[(source, split)]


@pytest.fixture(scope="module")
def small_run(tiniest, fmnist_calib, fmnist_test, mnist):
    config = RunConfig(
        n_calibration=60,
        n_test=60,
        scores=[ScoreSpec("Softmax")],
        scenarios=[ScenarioSpec(kind="vertical_flip"), ScenarioSpec(dataset="mnist")],
    )
    fake = _Loaders(
        tiniest,
        {
            ("fashion_mnist", "calibration"): fmnist_calib,
            ("fashion_mnist", "test"): fmnist_test,
            ("mnist", "test"): mnist,
        },
    )
    cache = RunCache()
    runs.share_loaded(cache, config, fake.model, fake.dataset)
    runs.share_loaded(cache, config, fake.model, fake.dataset)  # already there: nothing loaded
    result = run(config, cache)
    return config, cache, fake, result


def test_a_run_uses_what_the_dashboard_loaded(small_run, tiniest) -> None:
    config, cache, fake, result = small_run
    assert fake.calls == [
        ("model", "bundled", "tiniest"),
        ("data", "fashion_mnist", "calibration", None),
        ("data", "fashion_mnist", "test", None),
        ("data", "mnist", "test", None),
    ]
    assert cache.models[("bundled", "tiniest")] is tiniest
    assert result.ood_titles == ["Vertical flip", "MNIST digits"] and len(result.ind) == 60
    summary = runs.run_summary(result, 1.5, "10:00:00")
    assert summary == {
        "when": "10:00:00",
        "seconds": 1.5,
        "accuracy": result.accuracy,
        "n_scores": 1,
        "n_oods": 2,
        "forward_calls": 4,  # one batch each: calibration, InD test, its flip, MNIST
        "own_pass_scores": [],
    }


def test_exports_of_a_result(small_run) -> None:
    result = small_run[3]
    bundle = runs.export_bundle(result)
    assert {"report", "config", "metrics"} <= set(bundle)
    assert b"<html" in bundle["report"][:300].lower()
    toml, problem = runs.config_toml(result)
    assert (
        problem is None
        and RunConfig.from_toml(toml) == runs.parse_uploaded_config(toml.encode())[0]
    )
    frame = pd.read_parquet(io.BytesIO(runs.parquet_bytes(result.confidences_frame())))
    pd.testing.assert_frame_equal(frame, result.confidences_frame().reset_index(drop=True))


def test_exports_when_the_config_cannot_be_written(small_run, monkeypatch) -> None:
    result = small_run[3]

    def refuse(*args: object, **kwargs: object) -> str:
        raise TypeError("TOML cannot hold this value")

    monkeypatch.setattr(result.config, "to_toml", refuse)
    toml, problem = runs.config_toml(result)
    assert toml is None and "cannot be written as TOML (TOML cannot hold this value)" in problem
    bundle = runs.export_bundle(result)  # the report still is
    assert set(bundle) == {"report"} and b"<html" in bundle["report"][:300].lower()


def test_uploaded_configs() -> None:
    config, error = runs.parse_uploaded_config(example_config().to_toml().encode())
    assert error is None and config == example_config()
    assert (
        runs.describe_config(config)
        == "tiniest from bundled · fashion_mnist · 4 score(s) × 4 scenario(s)"
    )
    assert runs.parse_uploaded_config(b"[model\n")[1].startswith("Invalid run config")
    assert "no scores" in runs.parse_uploaded_config(b"[model]\nentry='tiniest'\n")[1]
    assert "not UTF-8" in runs.parse_uploaded_config(b"\xff\xfe")[1]


def test_run_cache_is_one_per_session() -> None:
    s: dict = {}
    cache = runs.run_cache(s)
    assert isinstance(cache, RunCache) and runs.run_cache(s) is cache


# ---------------------------------------------------------------------------- sources
def _session(**changes: object) -> dict:
    s = state.default_state(env={})
    s.update(changes)
    return s


def test_model_and_data_requests_from_the_inputs() -> None:
    assert sources.model_request(_session()) == ("bundled", "tiniest", None)
    s = _session(
        **{
            "w.model_src": state.MODEL_SOURCES[2],
            "w.local_dir": "/hub",
            "w.local_entry": "e",
            "w.trust./hub": True,
        }
    )
    assert sources.model_request(s) == ("/hub", "e", True)
    s = _session(**{"w.model_src": state.MODEL_SOURCES[1], "w.gh_repo": "o/r", "w.gh_entry": "e"})
    assert sources.model_request(s) == ("o/r", "e", False)  # no box ticked: not trusted
    assert sources.data_request(_session()) == ("fashion_mnist", "calibration", "test", None)
    assert sources.data_request(_session(**{"w.bundled_data": "mnist"})) == (
        "mnist",
        "test",
        "test",
        None,
    )
    s = _session(
        **{
            "w.data_src": state.DATA_SOURCES[2],
            "w.hf_id": "o/d",
            "w.hf_config": " ",
            "w.hf_cal_split": "",
            "w.hf_test_split": "val",
        }
    )
    assert sources.data_request(s) == ("o/d", "train", "val", None)
    s = _session(**{"w.data_src": state.DATA_SOURCES[1], "w.data_path": " /d.npz "})
    assert sources.data_request(s) == ("/d.npz", "test", "test", None)
    assert sources.bundled_splits(["train"]) == ("train", "train")


def test_apply_model_success_failure_and_trust() -> None:
    loaded = []

    def load(repo, entry, trust_repo=None):
        loaded.append((repo, entry, trust_repo))
        if repo == "offline/repo":
            raise HubUnavailableError("GitHub is not reachable")
        if repo == "buggy/repo":
            raise RuntimeError("boom")

    s = _session(layers_version=0)
    assert sources.apply_model(s, " /hub ", " net ", True, load, lambda: ["1-2", "1-3"])
    assert (s["model_repo"], s["model_entry"], s["model_error"]) == ("/hub", "net", None)
    assert s["trusted_repos"] == ["/hub"] and s["layers"] == ["1-2", "1-3"]
    assert loaded[-1] == ("/hub", "net", True)
    assert not sources.apply_model(s, "offline/repo", "net", True, load, lambda: [])
    assert s["model_error"] == "GitHub is not reachable" and s["model_repo"] == "/hub"
    assert s["trusted_repos"] == ["/hub"]  # trust is remembered only for what loaded
    assert not sources.apply_model(s, "buggy/repo", "net", False, load, lambda: [])
    assert s["model_error"] == "Could not load 'net' from 'buggy/repo': RuntimeError: boom"
    assert not sources.apply_model(s, " ", "net", None, load, lambda: [])
    assert s["model_error"] == "Give both a repository and an entry point."
    version = s["layers_version"]
    assert sources.apply_model(s, "/hub", "net", False, load, lambda: ["9-9"])  # same model
    assert s["layers"] == ["1-2", "1-3"] and s["layers_version"] == version


def test_apply_data_and_incompatible_layers() -> None:
    def load(source, split, config):
        if source == "missing.npz":
            raise DataUnavailableError("No such file: missing.npz")
        labels = torch.full((4,), -1) if source == "flat_folder" else torch.arange(4) % 2
        names = [] if source == "flat_folder" else ["a", "b"]
        return ImageDataset(torch.zeros(4, 1, 2, 2), labels, names, name=source)

    def broken_picks() -> list[str]:
        raise ValueError("The network failed on an example input")

    s = _session(layers_version=0)
    assert sources.apply_data(s, "o/d", "train", "test", "cfg", load, broken_picks)
    assert (s["ind_source"], s["ind_config"], s["cal_split"], s["test_split"]) == (
        "o/d",
        "cfg",
        "train",
        "test",
    )
    assert s["layers"] == [] and s["data_error"] is None  # the page says why
    assert not sources.apply_data(s, "missing.npz", "test", "test", None, load, broken_picks)
    assert s["data_error"] == "No such file: missing.npz" and s["ind_source"] == "o/d"
    assert not sources.apply_data(s, "  ", "test", "test", None, load, broken_picks)
    assert "Give a dataset" in s["data_error"]
    # an unlabelled folder (the usual OoD layout) cannot be the InD data: said, data kept
    assert not sources.apply_data(s, "flat_folder", "test", "test", None, load, broken_picks)
    assert "has no labels" in s["data_error"] and "OoD set" in s["data_error"]
    assert s["ind_source"] == "o/d"


@pytest.mark.parametrize(
    ("sizes", "avail", "shared", "expected"),
    [
        ((1000, 1000), (1000, 1000), True, (500, 500)),  # a 1,000-image file, the defaults
        ((1000, 1000), (5000, 5000), False, (1000, 1000)),  # two splits: unchanged
        ((300, 100), (1000, 1000), True, (300, 100)),  # fits: kept as entered
        ((900, 300), (1000, 1000), True, (750, 250)),  # scaled in proportion
        ((None, None), (40, 40), True, (20, 20)),  # empty = all, then shared
        ((5000, 5000), (800, 300), False, (800, 300)),  # each lowered to its split
        ((0, 10), (1, 1), True, (1, 1)),  # one sample: at least one each
    ],
)
def test_dashboard_sizes_fit_the_data(sizes, avail, shared, expected) -> None:
    assert sources.fit_sizes(*sizes, *avail, shared) == expected
