"""Unit tests of ood_core.explore: thresholds, confusion counts, galleries, selections, layers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ood_core import explore
from ood_core.metrics import ROC


def test_threshold_accepts_at_least_target() -> None:
    rng = np.random.default_rng(0)
    ind = rng.normal(size=1000)
    for acc in (0.5, 0.8, 0.95, 0.99, 1.0):
        t = explore.threshold_for_acceptance(ind, acc)
        accepted = np.mean(ind > t)
        assert accepted >= acc - 1e-12
        assert accepted <= acc + 1 / len(ind) + 1e-12  # the largest such threshold


def test_threshold_with_ties_never_below_target() -> None:
    ind = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0])
    t = explore.threshold_for_acceptance(ind, 0.8)  # may reject 2 samples, ties reject 3
    assert np.mean(ind > t) >= 0.8
    assert t < 0.0
    t = explore.threshold_for_acceptance(ind, 0.7)
    assert t == 0.0 and np.mean(ind > t) == 0.7
    assert explore.threshold_for_acceptance(ind, 0.0) == 3.0


def test_threshold_errors_and_infinities() -> None:
    with pytest.raises(ValueError, match="acceptance"):
        explore.threshold_for_acceptance([1.0], 1.5)
    with pytest.raises(ValueError, match="at least one"):
        explore.threshold_for_acceptance([np.nan], 0.9)
    assert explore.threshold_for_acceptance([-np.inf, 0.0], 1.0) == -np.inf


def test_confusion_counts_and_rates() -> None:
    ind = np.array([0.1, 0.5, 0.9, 0.95])
    ood = np.array([0.05, 0.2, 0.6])
    c = explore.confusion(ind, ood, 0.5)
    assert (c.ind_accepted, c.ind_rejected, c.ood_accepted, c.ood_rejected) == (2, 2, 1, 2)
    assert c.ind_acceptance == 0.5 and c.ood_rejection == pytest.approx(2 / 3)
    assert c.fpr == 0.5 and c.tpr == pytest.approx(2 / 3)
    m = c.matrix()
    assert m.shape == (2, 2) and int(m.to_numpy().sum()) == 7


def test_operating_point_lies_on_the_roc() -> None:
    rng = np.random.default_rng(1)
    ind, ood = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    roc = ROC(ind, ood)
    for acc in (0.6, 0.9, 0.95):
        fpr, tpr = explore.operating_point(ind, ood, explore.threshold_for_acceptance(ind, acc))
        assert fpr <= 1 - acc + 1e-12
        # an attainable point: on or under the ROC staircase (its Pareto front)
        assert tpr <= roc.tpr[roc.fpr <= fpr + 1e-12].max() + 1e-12
        flagged = np.concatenate([ind, ood]) <= explore.threshold_for_acceptance(ind, acc)
        assert tpr == pytest.approx(flagged[len(ind):].mean())


def test_extreme_indices() -> None:
    conf = np.array([0.3, np.nan, 0.9, 0.1, 0.9])
    assert explore.extreme_indices(conf, 2, most=True).tolist() == [2, 4]
    assert explore.extreme_indices(conf, 2, most=False).tolist() == [3, 0]
    assert explore.extreme_indices(conf, 10).tolist() == [2, 4, 0, 3]
    assert explore.extreme_indices(torch.tensor([1.0, 2.0]), 1).tolist() == [1]


def test_histogram_bins_match_plots() -> None:
    from ood_core import plots

    series = {"InD": np.array([0.0, 1.0, np.inf]), "OoD": np.array([-1.0, 0.5])}
    lo, hi, size = explore.histogram_bins(list(series.values()), nbins=60)
    fig = plots.histogram_figure(series)
    xbins = fig.data[0].xbins
    assert (lo, size) == pytest.approx((xbins.start, xbins.size))
    assert hi == 1.0


def test_selection_to_indices_points_and_box() -> None:
    series = {"InD": np.array([0.0, 0.1, 0.5, 1.0]), "OoD": np.array([0.0, 0.05, 0.95])}
    lo, _, size = explore.histogram_bins(list(series.values()), nbins=10)
    # a bar of the OoD trace (curve 1) around 0.0: first bin [0, 0.1)
    sel = {"points": [{"curve_number": 1, "x": lo + size / 2}], "box": []}
    assert explore.selection_to_indices(sel, series, nbins=10) == {"OoD": pytest.approx([0, 1])}
    # the last bin includes the maximum
    sel = {"points": [{"curve_number": 0, "x": 0.95}]}
    assert explore.selection_to_indices(sel, series, nbins=10)["InD"].tolist() == [3]
    # explicit point numbers win
    sel = {"points": [{"curve_number": 0, "x": 0.0, "point_numbers": [2]}]}
    assert explore.selection_to_indices(sel, series, nbins=10)["InD"].tolist() == [2]
    # box over [0.4, 1] without reported bars: every dataset
    sel = {"points": [], "box": [{"x": [1.0, 0.4], "y": [0, 5]}]}
    out = explore.selection_to_indices(sel, series, nbins=10)
    assert out["InD"].tolist() == [2, 3] and out["OoD"].tolist() == [2]
    # with bars reported inside the box, only those bars count
    sel["points"] = [{"curve_number": 1, "x": 0.95}]
    assert list(explore.selection_to_indices(sel, series, nbins=10)) == ["OoD"]
    assert explore.selection_to_indices(None, series) == {}
    assert explore.selection_to_indices({"points": [{"curve_number": 7, "x": 0}]}, series) == {}


def _table() -> pd.DataFrame:
    rows = [
        ("0-1", 0, "Net", 100, 0), ("1-1", 1, "Conv2d", 10, 10), ("1-2", 1, "Block", 40, 0),
        ("2-1", 2, "Conv2d", 40, 40), ("1-3", 1, "Sequential", 20, 0),
        ("1-4", 1, "AdaptiveAvgPool2d", 0, 0), ("1-5", 1, "Linear", 30, 30),
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["id", "depth", "type", "params", "own_params"])


def test_layer_quick_picks_and_options() -> None:
    table = _table()
    picks = explore.layer_quick_picks(table)
    assert picks == {"logits": ["1-5"], "pooled": ["1-4"], "blocks": ["1-2", "1-3"]}
    assert explore.layer_options(table, "none") == []
    assert "1-4" not in explore.layer_options(table, "params")
    assert "0-1" not in explore.layer_options(table, "any")
    assert explore.default_layers(["1-4", "1-5"], table, "params") == ["1-5"]
    assert explore.default_layers(["1-2", "1-4"], table, "any", max_layers=1) == ["1-4"]
    assert explore.default_layers([], table, "any") == ["1-4"]
    assert explore.default_layers(["1-4"], table, "none") == []


def test_parse_list_param() -> None:
    assert explore.parse_list_param("") is None
    assert explore.parse_list_param("[1, 2.5]") == [1, 2.5]
    assert explore.parse_list_param("bits:5, median:2") == ["bits:5", "median:2"]
    assert explore.parse_list_param("1, 0.5") == [1, 0.5]
    with pytest.raises(ValueError, match="JSON"):
        explore.parse_list_param("[1,")


def test_check_score_messages() -> None:
    assert explore.check_score("Softmax", {}, []) == []
    assert any("k=50" in m for m in explore.check_score("KNN", {"k": 50}, ["1-11"], 20))
    assert any("at least one layer" in m for m in explore.check_score("KNN", {"k": 5}, []))
    assert any("unknown" in m for m in explore.check_score("KNN", {"kk": 5}, ["1-1"]))
    assert any("not allowed" in m for m in explore.check_score("GradNorm", {}, ["1-4"], None,
                                                               ["1-5"]))


def test_predict_matches_argmax() -> None:
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.rand(10, 1, 2, 2)
    assert explore.predict(net, x, batch_size=3).tolist() == net(x).argmax(1).tolist()


def test_heatmap_frame_and_intervals() -> None:
    frame = pd.DataFrame({
        "score": ["KNN(k=5)", "KNN(k=5)", "Softmax()"], "layers": ["(1, 1)", "(1, 2)", ""],
        "ood": ["A", "A", "A"], "metric": ["AUC()"] * 3, "value": [0.7, 0.8, 0.6],
        "ci_low": [0.6, 0.7, 0.5], "ci_high": [0.8, 0.9, 0.7],
    })  # fmt: skip
    hm = explore.heatmap_frame(frame, "AUC()")
    assert set(hm["score"]) == {"KNN(k=5)"} and len(hm) == 2
    assert explore.heatmap_frame(frame, "AUC()", ood="B").empty
    ci = explore.interval_columns(frame)
    assert ci.loc["Softmax()", "A | AUC() CI"] == "[0.500, 0.700]"
    assert ci.loc["KNN(k=5) @ (1, 2)", "A | AUC() CI"] == "[0.700, 0.900]"
    assert explore.interval_columns(frame.assign(ci_low=np.nan)).empty
