"""Unit tests of ood_lens_app.widgets: what a widget shows, derived from a Param description
(its flags, never its range text)."""

from __future__ import annotations

import math

import pytest

from ood_core.params import Param
from ood_core.scores import get_score_class
from ood_lens_app import widgets


def _desc(score: str, name: str) -> dict:
    return next(d for d in get_score_class(score).describe_params() if d["name"] == name)


def test_widget_kinds_of_real_parameters() -> None:
    assert widgets.widget_kind(_desc("GradNorm", "discard_functional_forward")) == "checkbox"
    assert widgets.widget_kind(_desc("KNN", "index_metric")) == "select"
    assert widgets.widget_kind(_desc("MultiMahalanobis", "shrinkage")) == "text"
    assert widgets.widget_kind(_desc("DeepMahalanobis", "weights")) == "text"  # a list
    assert widgets.widget_kind(_desc("ODIN", "fgm_norm")) == "text"  # default inf
    assert widgets.widget_kind(_desc("KNN", "k")) == "int"
    assert widgets.widget_kind(_desc("Energy", "temperature")) == "float"


def test_initial_values() -> None:
    assert widgets.initial_value(_desc("KNN", "k")) == 15
    assert widgets.initial_value(_desc("ODIN", "fgm_norm")) == "inf"
    assert widgets.initial_value(_desc("FeatureSqueezing", "squeezers")).startswith("bits:5, ")
    assert widgets.initial_value(_desc("DeepMahalanobis", "weights")) == ""
    assert widgets.initial_value(_desc("ViM", "dim")) == 1  # nullable int, no default: its low
    no_default = [
        (Param("a", "int", None, low=0, low_exclusive=True), 1),
        (Param("b", "float", None, low=0.0, low_exclusive=True, high=0.5), 0.5),
        (Param("c", "float", None), 1.0),
        (Param("d", "choice", None, choices=("x", "y")), "x"),
        (Param("e", "str", None), ""),
    ]
    for param, expected in no_default:
        value = widgets.initial_value(param.as_dict())
        assert value == expected and type(value) is type(expected), param


def test_bounds_use_the_exclusive_flags() -> None:
    assert widgets.int_bounds(_desc("KNN", "k")) == (1, None)
    assert widgets.int_bounds(
        Param("n", "int", 5, low=0, high=10, low_exclusive=True, high_exclusive=True).as_dict()
    ) == (1, 9)
    assert widgets.float_bounds(_desc("Gram", "cut_off")) == (None, None)  # (0, 0.5)
    assert widgets.float_bounds(_desc("ASH", "percentile")) == (0.0, None)  # [0, 100)
    assert widgets.float_bounds(_desc("GEN", "gamma")) == (None, 1.0)  # (0, 1]


def test_clamp() -> None:
    k = _desc("KNN", "k")
    assert widgets.clamp(k, 0) == 1 and widgets.clamp(k, 7.0) == 7 and widgets.clamp(k, "x") == 15
    assert widgets.clamp(k, math.inf) == 15
    gamma = _desc("GEN", "gamma")
    assert widgets.clamp(gamma, 3) == 1.0 and widgets.clamp(gamma, None) == 0.1
    assert widgets.clamp(_desc("KNN", "index_metric"), "ip") == "ip"  # not a number: as is


@pytest.mark.parametrize(
    ("value", "step"), [(0.0, 0.1), (0.5, 0.01), (90.0, 1.0), (-3.0, 0.1), (math.inf, 0.1)]
)
def test_float_step(value: float, step: float) -> None:
    assert widgets.float_step(value) == pytest.approx(step)


def test_help_text() -> None:
    text = widgets.help_text(_desc("DeepMahalanobis", "weights"))
    assert "Allowed: a list." in text and text.endswith("Comma-separated or JSON list.")
    assert widgets.help_text(_desc("KNN", "k")).endswith("Allowed: >= 1.")
