"""Unit tests of the dashboard's session-state defaults (ood_lens_app.state), its page registry,
sidebar text and error messages (layout, errors), without Streamlit running."""

from __future__ import annotations

from pathlib import Path

import pytest

from ood_core.config import RunConfig, ScenarioSpec, ScoreSpec, example_config
from ood_core.data import DataUnavailableError
from ood_core.hub import HubUnavailableError
from ood_lens_app import errors, layout, state

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_come_from_the_example_config() -> None:
    cfg = example_config()
    s = state.default_state(env={})
    assert (s["model_repo"], s["model_entry"]) == (cfg.model_repo, cfg.model_entry)
    assert s["w.bundled_entry"] == cfg.model_entry and s["w.model_src"] == state.MODEL_SOURCES[0]
    assert (s["ind_source"], s["cal_split"], s["test_split"]) == (
        cfg.ind_dataset,
        cfg.calibration_split,
        cfg.test_split,
    )
    assert s["w.scores"] == [spec.name for spec in cfg.scores]
    assert s["w.perts"] == [sc.kind for sc in cfg.scenarios if sc.kind]
    assert s["w.ood_bundled"] == [sc.dataset for sc in cfg.scenarios if sc.dataset]
    assert s["w.metrics"] == cfg.metrics and s["w.n_boot"] == cfg.n_boot
    assert (s["w.n_cal"], s["w.n_test"]) == (cfg.n_calibration, cfg.n_test)
    assert s["w.baseline"] == cfg.scores[0].name
    # the Layers page starts on every layer the example's scores read, in network order
    assert s["layers"] == ["1-5", "1-11", "1-12"] == state.initial_layers(cfg)


def test_example_choices_set_per_score_layers_and_parameters() -> None:
    cfg = example_config()
    c = state.example_choices(cfg)
    for spec in cfg.scores:
        if spec.layers:
            assert c[state.score_layer_key(spec.name)] == spec.layers
            assert c["score_layers_src"][spec.name] == tuple(state.initial_layers(cfg))
        for name, value in spec.params.items():
            assert c[state.param_key(spec.name, name)] == value
    assert c["w.p.KNN.k"] == 15 and c["w.p.pert:darker.factor"] == 0.5
    assert "Softmax" not in c["score_layers_src"]


def test_other_configs_map_to_their_widgets() -> None:
    cfg = RunConfig(
        model_repo="owner/repo",
        model_entry="net",
        ind_dataset="someone/data",
        calibration_split="train",
        test_split="validation",
        n_calibration=None,
        scores=[ScoreSpec("Energy"), ScoreSpec("KNN", {"k": 3}, ["1-2"])],
        scenarios=[
            ScenarioSpec(dataset="mnist"),
            ScenarioSpec(dataset="x/y", split="s", config="c"),
        ],
        baseline="KNN",
    )
    s = state.default_state(cfg, env={})
    assert s["w.model_src"] == state.MODEL_SOURCES[1]
    assert (s["w.gh_repo"], s["w.gh_entry"]) == ("owner/repo", "net")
    assert s["w.data_src"] == state.DATA_SOURCES[2] and s["w.hf_id"] == "someone/data"
    assert (s["w.hf_cal_split"], s["w.hf_test_split"]) == ("train", "validation")
    assert s["w.ood_bundled"] == ["mnist"] and s["w.perts"] == []
    assert (s["w.ood_extra"], s["w.ood_extra_split"], s["w.ood_extra_config"]) == ("x/y", "s", "c")
    assert s["w.n_cal"] is None and s["w.baseline"] == "KNN" and s["layers"] == ["1-2"]
    assert state.default_baseline(RunConfig()) == "-"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("300", 300),
        (" 7 ", 7),
        ("", 1000),
        ("0", 1000),
        ("-5", 1000),
        ("many", 1000),
        ("2.5", 1000),
    ],
)
def test_default_n_from_the_environment(text: str, expected: int) -> None:
    assert state.default_n(1000, {state.ENV_DEFAULT_N: text}) == expected
    assert state.default_state(env={state.ENV_DEFAULT_N: text})["w.n_test"] == expected


def test_init_state_fills_in_and_keeps_what_is_set() -> None:
    s: dict = {"w.n_cal": 200, "w.L.KNN": ["1-11"], "w.p.KNN.k": 5}
    state.init_state(s)
    assert s["w.n_cal"] == 200 and s["w.L.KNN"] == ["1-11"] and s["w.p.KNN.k"] == 5
    assert s["w.L.Gram"] == ["1-5", "1-11", "1-12"] and s["initialised"] is True
    assert s["score_layers_src"]["KNN"] == ("1-5", "1-11", "1-12")
    s["w.scores"] = ["Energy"]
    s["layers"] = ["1-1"]
    del s["w.L.Gram"]
    state.init_state(s)  # a rerun: nothing the user changed is reset, per-score defaults not re-set
    assert s["w.scores"] == ["Energy"] and s["layers"] == ["1-1"] and "w.L.Gram" not in s


def test_layer_sort_key() -> None:
    assert sorted(["1-12", "2-1", "1-5", "odd"], key=state.layer_sort_key) == [
        "1-5",
        "1-12",
        "2-1",
        "odd",
    ]


def test_page_registry_points_at_the_page_files() -> None:
    assert [p.title for p in layout.PAGES] == [
        "Model & data",
        "Layers",
        "Scores & scenarios",
        "Results",
        "Runs",
    ]
    for page in layout.PAGES:
        path = ROOT / page.path
        assert path.is_file() and path.parent.name == "views", page
        assert "sys.path" not in path.read_text()


def test_sidebar_lines() -> None:
    s = state.default_state(env={})
    lines = layout.sidebar_lines(s)
    assert lines[0] == "**Model:** `tiniest` (bundled hub)"
    assert "Fashion-MNIST" in lines[1] and "1000 calibration / 1000 test" in lines[1]
    assert lines[2] == "**Layers:** 1-5, 1-11, 1-12" and lines[3] == "**Last run:** none yet"
    s |= {
        "layers": [],
        "model_repo": "/some/dir",
        "w.n_cal": None,
        "last_run": {
            "when": "12:00:00",
            "seconds": 2.5,
            "accuracy": 0.9,
            "n_scores": 3,
            "n_oods": 2,
        },
    }
    lines = layout.sidebar_lines(s)
    assert "(/some/dir)" in lines[0] and "all calibration" in lines[1]
    assert lines[2] == "**Layers:** none"
    assert "12:00:00 · 2.5 s" in lines[3] and "90.0% · 3 scores × 2 OoD sets" in lines[3]


def test_error_messages_show_user_errors_as_is() -> None:
    for exc in (ValueError("bad k"), HubUnavailableError("offline"), DataUnavailableError("gone")):
        assert errors.page_message(exc) == errors.run_message(exc) == str(exc)
        assert errors.load_message(exc, "'x'") == str(exc)
    bug = KeyError("boom")
    assert errors.page_message(bug).startswith("Something went wrong: KeyError: 'boom'.")
    assert "server log" in errors.page_message(bug)
    assert errors.run_message(bug) == "The run failed: KeyError: 'boom'"
    assert (
        errors.load_message(bug, "'net' from 'r'")
        == "Could not load 'net' from 'r': KeyError: 'boom'"
    )
