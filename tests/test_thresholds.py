"""Thresholds, confusion counts and operating points (ood_core.metrics) and the shared
histogram bins (ood_core.plots): the one rule every view uses (reject when conf <= t)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ood_core import metrics, plots
from ood_core.metrics import ROC


def test_threshold_accepts_at_least_target() -> None:
    rng = np.random.default_rng(0)
    ind = rng.normal(size=1000)
    for acc in (0.5, 0.8, 0.95, 0.99, 1.0):
        t = metrics.threshold_for_acceptance(ind, acc)
        accepted = np.mean(ind > t)
        assert accepted >= acc - 1e-12
        assert accepted <= acc + 1 / len(ind) + 1e-12  # the largest such threshold


def test_threshold_with_ties_never_below_target() -> None:
    ind = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0])
    t = metrics.threshold_for_acceptance(ind, 0.8)  # may reject 2 samples, ties reject 3
    assert np.mean(ind > t) >= 0.8
    assert t < 0.0
    t = metrics.threshold_for_acceptance(ind, 0.7)
    assert t == 0.0 and np.mean(ind > t) == 0.7
    assert metrics.threshold_for_acceptance(ind, 0.0) == 3.0


def test_threshold_errors_and_infinities() -> None:
    with pytest.raises(ValueError, match="acceptance"):
        metrics.threshold_for_acceptance([1.0], 1.5)
    with pytest.raises(ValueError, match="at least one"):
        metrics.threshold_for_acceptance([np.nan], 0.9)
    assert metrics.threshold_for_acceptance([-np.inf, 0.0], 1.0) == -np.inf
    assert metrics.threshold_for_acceptance(torch.tensor([[1.0], [2.0]]), 0.5) == 1.0


def test_confusion_counts_and_rates() -> None:
    ind = np.array([0.1, 0.5, 0.9, 0.95])
    ood = np.array([0.05, 0.2, 0.6])
    c = metrics.confusion(ind, ood, 0.5)
    assert (c.ind_accepted, c.ind_rejected, c.ood_accepted, c.ood_rejected) == (2, 2, 1, 2)
    assert c.ind_acceptance == 0.5 and c.ood_rejection == pytest.approx(2 / 3)
    assert c.fpr == 0.5 and c.tpr == pytest.approx(2 / 3)
    m = c.matrix()
    assert m.shape == (2, 2) and int(m.to_numpy().sum()) == 7
    assert m.loc["OoD", "rejected"] == 2 and m.loc["InD", "accepted"] == 2
    nan = metrics.confusion([np.nan, 1.0], [], 0.0)  # NaN is rejected; empty OoD: no rate
    assert (nan.ind_rejected, nan.ind_accepted) == (1, 1) and np.isnan(nan.ood_rejection)


def test_operating_point_lies_on_the_roc() -> None:
    rng = np.random.default_rng(1)
    ind, ood = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    roc = ROC(ind, ood)
    for acc in (0.6, 0.9, 0.95):
        fpr, tpr = metrics.operating_point(ind, ood, metrics.threshold_for_acceptance(ind, acc))
        assert fpr <= 1 - acc + 1e-12
        # an attainable point: on or under the ROC staircase (its Pareto front)
        assert tpr <= roc.tpr[roc.fpr <= fpr + 1e-12].max() + 1e-12
        flagged = np.concatenate([ind, ood]) <= metrics.threshold_for_acceptance(ind, acc)
        assert tpr == pytest.approx(flagged[len(ind) :].mean())


def test_histogram_bins_match_the_drawn_histogram() -> None:
    series = {"InD": np.array([0.0, 1.0, np.inf]), "OoD": np.array([-1.0, 0.5])}
    lo, hi, size = plots.histogram_bins(list(series.values()), nbins=60)
    fig = plots.histogram_figure(series)
    xbins = fig.data[0].xbins
    assert (lo, size) == pytest.approx((xbins.start, xbins.size))
    assert hi == 1.0
    assert plots.histogram_bins([np.array([2.0, 2.0])], nbins=10) == pytest.approx((1.5, 2.5, 0.1))


def test_histogram_bin_members() -> None:
    arrays = [np.array([0.0, 0.1, 0.5, 1.0]), np.array([0.0, 0.05, 0.95, np.nan])]
    first = plots.histogram_bin_members(arrays, 0.05, nbins=10)  # bar [0, 0.1)
    assert [m.tolist() for m in first] == [[0], [0, 1, 3]]  # NaN counts at the low edge
    last = plots.histogram_bin_members(arrays, 0.95, nbins=10)  # the last bar holds the maximum
    assert [m.tolist() for m in last] == [[3], [2]]
    assert [m.tolist() for m in plots.histogram_bin_members(arrays, 7.0, nbins=10)] == [[3], [2]]
