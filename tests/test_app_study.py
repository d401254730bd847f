"""The layer and parameter study (:mod:`ood_lens_app.study`) and the sweeps that feed it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from ood_core.config import ScoreSpec
from ood_lens_app import form, layers, runs, study
from ood_lens_app import state as state_mod
from ood_lens_app.state import param_sweep_key, param_sweep_values_key


@pytest.fixture(scope="module")
def choices(tiniest) -> layers.LayerChoices:
    return layers.layer_choices(tiniest, torch.zeros(1, 1, 28, 28))


def _frame(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    """A metric frame of ``(score, layers, ood, AUROC)`` rows."""
    return pd.DataFrame(
        [
            {"score": s, "layers": ly or np.nan, "ood": o, "metric": "AUC()", "value": v}
            for s, ly, o, v in rows
        ]
    )


FRAME = _frame(
    [
        ("Softmax()", "", "F", 0.70),
        ("Softmax()", "", "G", 0.80),
        ("DeepMahalanobis()", "1-10", "F", 0.90),  # a layer sweep, listed out of order
        ("DeepMahalanobis()", "1-10", "G", 0.70),
        ("DeepMahalanobis()", "1-3", "F", 0.60),
        ("DeepMahalanobis()", "1-3", "G", 0.60),
        ("DeepMahalanobis()", "1-5", "F", 0.85),
        ("DeepMahalanobis()", "1-5", "G", 0.85),
        ("KNN(k=50)", "1-11", "F", 0.75),  # a parameter sweep; k=15 is KNN's default
        ("KNN(k=50)", "1-11", "G", 0.75),
        ("KNN(k=5)", "1-11", "F", 0.80),
        ("KNN(k=5)", "1-11", "G", 0.86),
        ("KNN()", "1-11", "F", 0.82),
        ("KNN()", "1-11", "G", 0.82),
    ]
)


def test_each_sweep_is_laid_out_along_its_axis() -> None:
    table = study.study_frame(FRAME, "AUC()")
    maha = table[table["score"] == "DeepMahalanobis"]
    assert list(maha["axis"]) == ["layer"] * 3
    assert list(maha["x"]) == ["1-3", "1-5", "1-10"]  # network order, not text order
    np.testing.assert_allclose(maha["value"], [0.60, 0.85, 0.80])  # mean over F and G
    knn = table[table["score"] == "KNN"]
    assert list(knn["axis"]) == ["k"] * 3 and list(knn["x"]) == ["5", "15", "50"]
    np.testing.assert_allclose(knn["value"], [0.83, 0.82, 0.75])
    assert "Softmax" not in set(table["score"])  # one point is no sweep
    on_f = study.study_frame(FRAME, "AUC()", "F")
    np.testing.assert_allclose(on_f[on_f["score"] == "DeepMahalanobis"]["value"], [0.6, 0.85, 0.9])


def test_the_ranking_names_the_best_point_and_its_margins() -> None:
    table = study.study_frame(FRAME, "AUC()")
    best = study.ranking(table, baseline=0.75)  # Softmax's mean
    assert list(best["score"]) == ["DeepMahalanobis", "KNN"]  # best value first
    row = best.iloc[0]
    assert row["best"] == "1-5" and row["varies"] == "layer"
    assert row["margin over the next"] == pytest.approx(0.05)
    assert row["margin over the baseline"] == pytest.approx(0.10)
    knn = best.iloc[1]
    assert knn["best"] == "5" and knn["margin over the next"] == pytest.approx(0.01)
    assert math.isnan(study.ranking(table).iloc[0]["margin over the baseline"])
    own = study.ranking(table, 0.6, "DeepMahalanobis() @ 1-3")  # the baseline is in that sweep
    assert math.isnan(own.iloc[0]["margin over the baseline"])
    assert own.iloc[1]["margin over the baseline"] == pytest.approx(0.83 - 0.6)
    shown = study.ranking_text(own)  # as the Study tab shows it: signed, "-" where none
    assert list(shown["margin over the baseline"]) == ["-", "+0.230"]
    assert list(shown["margin over the next"]) == ["+0.050", "+0.010"]
    assert list(shown["value"]) == ["0.850", "0.830"]


def test_the_figure_marks_each_best_point_in_network_order() -> None:
    fig = study.study_figure(study.study_frame(FRAME, "AUC()"), "AUROC")
    stars = [t for t in fig.data if t.marker.symbol == "star"]
    assert [(s.x[0], round(s.y[0], 3)) for s in stars] == [("1-5", 0.85), ("k=5", 0.83)]
    assert list(fig.layout.xaxis.categoryarray) == ["1-3", "1-5", "1-10", "k=5", "k=15", "k=50"]


def test_a_parameter_sweep_gives_one_spec_per_value_and_replays(choices) -> None:
    state = state_mod.default_state(env={}) | {
        "w.scores": ["KNN"],
        "layers": ["1-11"],
        param_sweep_key("KNN"): "k",
        param_sweep_values_key("KNN"): "5, 15, 50",
    }
    specs, problems = form.score_specs(state, choices, 300)
    assert problems == {}
    assert specs == [ScoreSpec("KNN", {"k": k}, ["1-11"]) for k in (5, 15, 50)]
    for bad, said in (("5", "at least two values"), ("5, 5", "repeat"), ("[1,", "JSON")):
        state[param_sweep_values_key("KNN")] = bad
        assert said in " ".join(form.score_specs(state, choices, 300)[1]["KNN"])
    state[param_sweep_values_key("KNN")] = "5, 400"
    assert "400" in " ".join(form.score_specs(state, choices, 300)[1]["KNN"])  # k > n refused
    config = runs.demo_config()
    config.scores = [ScoreSpec("KNN", {"k": k}, ["1-11"]) for k in (5, 15, 50)]
    replay: dict = {}
    runs.apply_config(replay, config)
    assert replay[param_sweep_key("KNN")] == "k"
    assert replay[param_sweep_values_key("KNN")] == "5, 15, 50"
    assert replay["w.sweep.KNN"] is False
