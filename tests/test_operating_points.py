"""Operating points (:mod:`ood_core.operating_points`): closed-form counts and intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ood_core.operating_points import operating_point_table, undetected, wilson_interval


def test_wilson_interval_known_values() -> None:
    # 8 of 10 at 95 %: the textbook Wilson interval (0.4902, 0.9433)
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-5) and hi == pytest.approx(0.94331, abs=1e-5)
    assert wilson_interval(0, 20)[0] == 0.0 and 0.0 < wilson_interval(0, 20)[1] < 0.2
    assert wilson_interval(20, 20)[1] == 1.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_operating_points_count_what_the_threshold_rejects() -> None:
    ind = np.arange(1, 21, dtype=float)  # 1..20: 95 % acceptance rejects exactly one (1.0)
    ood = np.array([0.5, 1.0, 2.0, 30.0])  # <= 1.0 rejected: 0.5 and 1.0
    table = operating_point_table(["s"], [ind], [[ood]], ["far"], acceptance=0.95)
    row = table.iloc[0]
    assert row["threshold"] == 1.0 and row["InD accepted"] == "19 of 20"
    assert row["InD accepted (%)"] == 95.0 and row["OoD rejected"] == "2 of 4"
    lo, hi = wilson_interval(2, 4)
    assert row["95% interval (%)"] == f"{100 * lo:.1f} to {100 * hi:.1f}"
    # monotone transforms of the scores change the threshold, never the counts
    moved = operating_point_table(["s"], [np.exp(ind)], [[np.exp(ood)]], ["far"], 0.95)
    assert list(moved["OoD rejected"]) == ["2 of 4"] and list(moved["InD accepted"]) == ["19 of 20"]
    assert list(undetected(ood, 1.0)) == [3, 2]  # passing, most confident first


def test_a_held_out_threshold_measures_ind_on_the_other_half() -> None:
    rng = np.random.default_rng(0)
    ind, ood = rng.normal(1, 1, 1000), rng.normal(-1, 1, 500)
    table = operating_point_table(["s"], [ind], [[ood]], ["o"], 0.9, held_out=True, seed=3)
    assert table.iloc[0]["InD accepted"].endswith("of 500")  # the half that did not set it
    assert 85 < table.iloc[0]["InD accepted (%)"] < 95
    again = operating_point_table(["s"], [ind], [[ood]], ["o"], 0.9, held_out=True, seed=3)
    assert again.equals(table)
    with pytest.raises(ValueError, match="acceptance"):
        operating_point_table(["s"], [ind], [[ood]], ["o"], 0.0)
