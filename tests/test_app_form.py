"""Unit tests of ood_lens_app.form: form values (a state mapping) to a RunConfig, and the
problems it reports per score / scenarios / metrics / run."""

from __future__ import annotations

import pytest
import torch

from ood_core.config import example_config
from ood_core.perturbations import make_perturbation
from ood_core.scores import get_score_class
from ood_lens_app import form, layers, state


@pytest.fixture(scope="module")
def choices(tiniest) -> layers.LayerChoices:
    return layers.layer_choices(tiniest, torch.zeros(1, 1, 28, 28))


def _state(**changes: object) -> dict:
    s = state.default_state(env={}) | state.example_choices()
    s.update(changes)
    return s


def test_parse_list_param() -> None:
    assert form.parse_list_param("") is None
    assert form.parse_list_param("[1, 2.5]") == [1, 2.5]
    assert form.parse_list_param("bits:5, median:2") == ["bits:5", "median:2"]
    assert form.parse_list_param("1, 0.5") == [1, 0.5]
    with pytest.raises(ValueError, match="JSON"):
        form.parse_list_param("[1,")
    assert form.parse_list_param(" None ") is None and form.parse_list_param("a, 'b'") == ["a", "b"]


def test_check_score_messages() -> None:
    assert form.check_score("Softmax", {}, []) == []
    assert any("k=50" in m for m in form.check_score("KNN", {"k": 50}, ["1-11"], 20))
    assert any("at least one layer" in m for m in form.check_score("KNN", {"k": 5}, []))
    assert any("unknown" in m for m in form.check_score("KNN", {"kk": 5}, ["1-1"]))
    assert any("not allowed" in m for m in form.check_score("GradNorm", {}, ["1-4"], None, ["1-5"]))


def test_param_values_keep_what_differs_from_the_defaults() -> None:
    knn = get_score_class("KNN").describe_params()
    assert form.param_values({}, "KNN", knn) == ({"k": 15}, [])  # required: always given
    assert form.param_values({"w.p.KNN.k": 7, "w.p.KNN.index_metric": "l2"}, "KNN", knn) == (
        {"k": 7},
        [],
    )
    values, _ = form.param_values(
        {"w.p.KNN.k": 7, "w.p.KNN.index_metric": "l2"}, "KNN", knn, keep_defaults=True
    )
    assert values == {"k": 7, "index_metric": "l2"}  # parameters without a widget stay out
    # nullable: the None box wins
    assert form.param_values({"w.p.KNN.act_norm.none": True}, "KNN", knn)[0]["act_norm"] is None
    # lists and non-finite floats are typed as text
    deep = get_score_class("DeepMahalanobis").describe_params()
    weights = {"w.p.DM.weights": "1, 2", "w.p.DM.weights.none": False}  # None box unticked
    assert form.param_values(weights, "DM", deep)[0]["weights"] == [1, 2]
    assert "weights" not in form.param_values({"w.p.DM.weights": "1, 2"}, "DM", deep)[0]
    odin = get_score_class("ODIN").describe_params()
    assert form.param_values({"w.p.ODIN.fgm_norm": " 2 "}, "ODIN", odin)[0]["fgm_norm"] == 2.0
    assert "fgm_norm" not in form.param_values({"w.p.ODIN.fgm_norm": "inf"}, "ODIN", odin)[0]
    _, problems = form.param_values(weights | {"w.p.DM.weights": "[1,"}, "DM", deep)
    assert problems and problems[0].startswith("DM: parameter 'weights': cannot read")
    _, problems = form.param_values({"w.p.ODIN.fgm_norm": "big"}, "ODIN", odin)
    assert problems and "fgm_norm" in problems[0]


def test_the_default_form_builds_the_example_config(choices: layers.LayerChoices) -> None:
    config, problems = form.build_config(_state(), choices)
    assert problems == {} and config is not None
    example = example_config()
    assert config.scores == example.scores
    assert config.metrics == example.metrics and config.baseline == 0
    assert (config.model_repo, config.model_entry, config.ind_dataset) == (
        example.model_repo,
        example.model_entry,
        example.ind_dataset,
    )
    assert (config.n_calibration, config.n_test, config.seed) == (1000, 1000, example.seed)
    # the same scenarios (a parameter at its default is left out of the form's spec)
    assert [sc.describe() for sc in config.scenarios] == [sc.describe() for sc in example.scenarios]
    for got, want in zip(config.scenarios, example.scenarios, strict=True):
        if want.kind:
            assert (
                make_perturbation(got.kind, **got.params).describe()
                == make_perturbation(want.kind, **want.params).describe()
            )
    config.validate()


def test_layer_sweep_and_baseline(choices: layers.LayerChoices) -> None:
    s = _state(
        **{
            "w.scores": ["Softmax", "KNN"],
            "w.L.KNN": ["1-8", "1-11"],
            "w.sweep.KNN": True,
            "w.baseline": "KNN",
            "w.n_cal": 200,
        }
    )
    config, problems = form.build_config(s, choices)
    assert problems == {}
    assert [(sc.name, sc.layers) for sc in config.scores] == [
        ("Softmax", []),
        ("KNN", ["1-8"]),
        ("KNN", ["1-11"]),
    ]
    assert config.baseline == 1 and config.n_calibration == 200


def test_problems_are_reported_where_they_belong(choices: layers.LayerChoices) -> None:
    s = _state(
        **{
            "w.n_cal": 10,
            "w.p.pert:darker.factor": 5.0,
            "w.metric_custom": "AUC(; MCC()",
            "w.scores": ["KNN", "GradNorm"],
            "w.L.GradNorm": ["1-11"],
        }
    )
    s["score_layers_src"]["GradNorm"] = tuple(s["layers"])  # the user's own (invalid) choice
    config, problems = form.build_config(s, choices)
    assert config is None
    assert any("k=15" in m and "10 calibration" in m for m in problems["KNN"])
    assert s["w.L.GradNorm"] == ["1-5", "1-12"]  # 1-11 holds no parameters: reset to the
    # Layers page selection (1-5, 1-11, 1-12) filtered by GradNorm's rule
    assert "GradNorm" not in problems
    assert len(problems["scenarios"]) == 1 and "factor" in problems["scenarios"][0]
    assert len(problems["metrics"]) == 1 and "AUC(" in problems["metrics"][0]
    empty = _state(**{"w.scores": [], "w.perts": [], "w.ood_bundled": [], "w.metrics": []})
    config, problems = form.build_config(empty, choices)
    assert config is None and problems == {
        "run": [
            "Choose at least one score.",
            "Choose at least one OoD scenario.",
            "Choose at least one metric.",
        ]
    }


def test_scenarios_and_metrics() -> None:
    s = _state(
        **{
            "w.perts": ["gaussian_noise"],
            "w.p.pert:gaussian_noise.sigma": 0.3,
            "w.ood_bundled": [],
            "w.ood_extra": " owner/name ",
            "w.ood_extra_config": " ",
            "w.ood_extra_split": "",
        }
    )
    specs, problems = form.scenario_specs(s)
    assert problems == []
    assert [(sc.kind, sc.params, sc.dataset, sc.split, sc.config) for sc in specs] == [
        ("gaussian_noise", {"sigma": 0.3}, None, "test", None),
        (None, {}, "owner/name", "test", None),
    ]
    s = _state(**{"w.metrics": ["AUC()"], "w.metric_custom": "AUC() ; TPR(max_fpr=0.1);;"})
    assert form.metric_list(s) == (["AUC()", "TPR(max_fpr=0.1)"], [])


def test_pick_baseline_and_sizes() -> None:
    assert form.pick_baseline("KNN", ["Softmax", "KNN"], "Softmax") == "KNN"
    assert form.pick_baseline("Gone", ["Energy", "Softmax"], "Softmax") == "Softmax"
    assert form.pick_baseline("Gone", ["Energy"], "Softmax") == "Energy"
    assert form.pick_baseline("Gone", [], "Softmax") == "-"
    assert form.n_samples(None) is None and form.n_samples(3.0) == 3
    assert "AUC()" in form.METRIC_CHOICES and len(set(form.METRIC_CHOICES)) == len(
        form.METRIC_CHOICES
    )
