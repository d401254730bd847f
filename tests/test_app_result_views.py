"""Unit tests of ood_lens_app.result_views: galleries, histogram selections, metric table,
heatmap and interval tables, threshold explorer state, captions (no Streamlit running)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from ood_core import metrics, plots
from ood_core.operating_points import wilson_interval
from ood_lens_app import result_views as rv


def test_extreme_indices() -> None:
    conf = np.array([0.3, np.nan, 0.9, 0.1, 0.9])
    assert rv.extreme_indices(conf, 2, most=True).tolist() == [2, 4]
    assert rv.extreme_indices(conf, 2, most=False).tolist() == [3, 0]
    assert rv.extreme_indices(conf, 10).tolist() == [2, 4, 0, 3]
    assert rv.extreme_indices(torch.tensor([1.0, 2.0]), 1).tolist() == [1]


def test_selection_to_indices_points_and_box() -> None:
    series = {"InD": np.array([0.0, 0.1, 0.5, 1.0]), "OoD": np.array([0.0, 0.05, 0.95])}
    lo, _, size = plots.histogram_bins(list(series.values()), nbins=10)
    # a bar of the OoD trace (curve 1) around 0.0: first bin [0, 0.1)
    sel = {"points": [{"curve_number": 1, "x": lo + size / 2}], "box": []}
    assert rv.selection_to_indices(sel, series, nbins=10) == {"OoD": pytest.approx([0, 1])}
    # the last bin includes the maximum
    sel = {"points": [{"curve_number": 0, "x": 0.95}]}
    assert rv.selection_to_indices(sel, series, nbins=10)["InD"].tolist() == [3]
    # explicit point numbers win
    sel = {"points": [{"curve_number": 0, "x": 0.0, "point_numbers": [2]}]}
    assert rv.selection_to_indices(sel, series, nbins=10)["InD"].tolist() == [2]
    # box over [0.4, 1] without reported bars: every dataset
    sel = {"points": [], "box": [{"x": [1.0, 0.4], "y": [0, 5]}]}
    out = rv.selection_to_indices(sel, series, nbins=10)
    assert out["InD"].tolist() == [2, 3] and out["OoD"].tolist() == [2]
    # bars Plotly reports with a box (centre rule) are ignored: the box's x-range decides
    sel["points"] = [{"curve_number": 1, "x": 0.95}]
    out = rv.selection_to_indices(sel, series, nbins=10)
    assert out["InD"].tolist() == [2, 3] and out["OoD"].tolist() == [2]
    assert rv.selection_to_indices(None, series) == {}
    assert rv.selection_to_indices({"points": [{"curve_number": 7, "x": 0}]}, series) == {}


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "score": ["KNN(k=5)", "KNN(k=5)", "Softmax()"],
            "layers": ["1-1", "1-2", ""],
            "ood": ["A", "A", "A"],
            "metric": ["AUC()"] * 3,
            "value": [0.7, 0.8, 0.6],
            "ci_low": [0.6, 0.7, 0.5],
            "ci_high": [0.8, 0.9, 0.7],
        }
    )


def test_heatmap_frame_and_intervals() -> None:
    frame = _frame()
    hm = rv.heatmap_frame(frame, "AUC()")
    assert set(hm["score"]) == {"KNN(k=5)"} and len(hm) == 2
    assert rv.heatmap_frame(frame, "AUC()", ood="B").empty
    ci = rv.interval_columns(frame)
    assert ci.loc["Softmax()", "A | AUC() CI"] == "[0.500, 0.700]"
    assert ci.loc["KNN(k=5) @ 1-2", "A | AUC() CI"] == "[0.700, 0.900]"
    assert rv.interval_columns(frame.assign(ci_low=np.nan)).empty


def _result(n_boot: int = 20, baseline: int | None = 2) -> SimpleNamespace:
    """The parts of a RunResult the Results page reads: 3 scores, OoD sets A and B."""
    rows = []
    for ood, shift in (("A", 0.0), ("B", 0.1)):
        for (score, layers), v in zip(
            _frame()[["score", "layers"]].itertuples(index=False), (0.7, 0.8, 0.6), strict=True
        ):
            for metric, dv in (("AUC()", 0.0), ("TPR(max_fpr=0.05)", -0.3)):
                value = v + shift + dv
                rows.append(
                    {
                        "score": score,
                        "layers": layers,
                        "ood": ood,
                        "metric": metric,
                        "value": value,
                        "ci_low": value - 0.1 if n_boot else np.nan,
                        "ci_high": value + 0.1 if n_boot else np.nan,
                    }
                )
    rng = np.random.default_rng(0)
    ind = rng.normal(1, 1, (3, 50))
    return SimpleNamespace(
        frame=pd.DataFrame(rows),
        config=SimpleNamespace(baseline=baseline, n_boot=n_boot),
        metrics=[metrics.AUC(), metrics.TPR(max_fpr=0.05)],
        score_names=["KNN(k=5) @ 1-1", "KNN(k=5) @ 1-2", "Softmax()"],
        ood_titles=["A", "B"],
        confs_ind=ind,
        confs_oods=[ind - 1, ind - 2],
    )


def test_metric_table_all_and_one_metric() -> None:
    result = _result()
    table = rv.metric_table(result)
    assert table.baseline_label == "Softmax()" and table.has_intervals
    assert list(table.frame.index) == ["KNN(k=5) @ 1-1", "KNN(k=5) @ 1-2", "Softmax()"]
    assert table.value_columns == [
        "A | AUC()",
        "A | TPR(max_fpr=0.05)",
        "B | AUC()",
        "B | TPR(max_fpr=0.05)",
    ]
    assert list(table.frame.columns[:2]) == ["A | AUC()", "A | AUC() CI"]  # value, then its CI
    one = rv.metric_table(result, "AUC()")
    assert one.value_columns == ["A", "B", "mean"]
    assert list(one.frame.columns) == ["A", "A CI", "B", "B CI", "mean"]
    assert one.frame.loc["Softmax()", "mean"] == pytest.approx(0.65)
    assert one.frame.loc["Softmax()", "B CI"] == "[0.600, 0.800]"
    plain = rv.metric_table(_result(n_boot=0, baseline=None), "AUC()")
    assert not plain.has_intervals and plain.baseline_label is None
    assert list(plain.frame.columns) == ["A", "B", "mean"]


def test_explorer_thresholds_from_widget_state() -> None:
    result = _result()
    state: dict = {}
    thr = rv.explorer_thresholds(result, state)  # first view: defaults, every score
    assert state["w.thr_mode"] == rv.THRESHOLD_MODES[0] and state["w.thr_score"] == 0
    assert set(thr) == {0, 1, 2}
    assert thr[1] == metrics.threshold_for_acceptance(result.confs_ind[1], rv.DEFAULT_ACCEPTANCE)
    state.update({"w.thr_mode": rv.THRESHOLD_MODES[1], "w.thr_score": 2, "w.thr_raw": 99.0})
    raw = rv.explorer_thresholds(result, state)  # out of range: reset inside the score's range
    lo, hi = plots.finite_range(list(rv.series(result, 2).values()))
    assert list(raw) == [2] and lo <= raw[2] <= hi and state["w.thr_raw"] == raw[2]
    state["w.thr_raw"] = float(lo)
    assert rv.explorer_thresholds(result, state) == {2: float(lo)}
    state["w.thr_score"] = 5  # a score that no longer exists
    rv.explorer_thresholds(result, state)
    assert state["w.thr_score"] == 0


def test_operating_points_and_confusion_rows() -> None:
    result = _result()
    thr = {0: 0.5, 2: 1.0}
    points = rv.operating_points(result, 1, thr)
    assert list(points) == ["KNN(k=5) @ 1-1", "Softmax()"]
    assert points["Softmax()"] == metrics.operating_point(
        result.confs_ind[2], result.confs_oods[1][2], 1.0
    )
    rows = rv.confusion_rows(result, 0, 0.5)
    summary = rv.confusion_summary(result.ood_titles, rows)
    assert list(summary["OoD scenario"]) == ["A", "B"]
    assert summary.loc[1, "OoD rejected (TPR)"] == pytest.approx(100 * rows[1].ood_rejection)
    assert summary.loc[0, "FPR"] == pytest.approx(100 - summary.loc[0, "InD accepted"])
    n = rows[1].ood_rejected + rows[1].ood_accepted
    assert summary.loc[1, "OoD rejected"] == f"{rows[1].ood_rejected:,} of {n:,}"
    lo, hi = wilson_interval(rows[1].ood_rejected, n)
    assert summary.loc[1, "95% interval"] == f"{100 * lo:.1f} to {100 * hi:.1f} %"


def test_index_choice_and_series() -> None:
    state = {"a": 3, "b": True, "c": 1}
    assert rv.index_choice(state, "a", 2) == 0 and rv.index_choice(state, "b", 2) == 0
    assert rv.index_choice(state, "c", 2) == 1 and rv.index_choice(state, "d", 4, default=9) == 3
    result = _result()
    assert list(rv.series(result, 1)) == ["InD", "A", "B"]
    np.testing.assert_array_equal(rv.series(result, 1)["B"], result.confs_oods[1][1])


def test_captions() -> None:
    names = ["cat", "dog"]
    assert rv.prediction_captions([0, 1, 5], [0, 0, 5], names) == ["cat", "dog → cat", "5"]
    caps = rv.confidence_captions(np.array([0.12345, 2.0]), [1, 0], labels=[0, 1], names=names)
    assert caps == ["dog<br>2", "cat<br>0.123"]
    assert rv.confidence_captions([0.5], [0]) == ["0.5"]


def test_the_gallery_shows_exactly_the_samples_passing_the_threshold() -> None:
    conf = np.array([0.2, 0.9, 0.5, 0.95, 0.5, 0.1])
    frame = rv.undetected_frame(conf, 0.5)
    assert list(frame["sample"]) == [3, 1]  # above 0.5 (0.5 itself is rejected), most first
    assert list(frame["confidence"]) == [0.95, 0.9] and set(frame["threshold"]) == {0.5}
    assert rv.undetected_frame(conf, 1.0).empty
    ind = np.linspace(0, 1, 101)
    t = metrics.threshold_for_acceptance(ind, 0.95)
    c = metrics.confusion(ind, conf, t)
    assert len(rv.undetected_frame(conf, t)) == c.ood_accepted  # the explorer's count
