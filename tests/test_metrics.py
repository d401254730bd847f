"""Tests for ood_core.metrics: exact values, sklearn agreement and property tests.

Convention: labels True = OoD, scores = confidences (higher = more in-distribution).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, matthews_corrcoef, roc_auc_score

from ood_core.metrics import (
    AUC,
    AUPR,
    DEFAULT_METRICS,
    MCC,
    METRICS,
    ROC,
    TNR,
    TPR,
    BootstrapResult,
    DetectionError,
    Metric,
    PairedTestResult,
    bootstrap,
    compute,
    paired_bootstrap_test,
    parse_metric,
)

T, F = True, False
PROPS = settings(max_examples=50, deadline=None)


def split(labels: tuple[bool, ...], scores: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(conf_ind, conf_ood) from OoD labels and confidences."""
    lab = np.asarray(labels, dtype=bool)
    sc = np.asarray(scores, dtype=float)
    return sc[~lab], sc[lab]


EXAMPLES = {
    "A": split((F, T, T, T, F), (0, 1, 2, 3, 3)),
    "B": split((T, F, F, T, F), (0, 1, 2, 3, 4)),
    "C": split((T, F), (0, 1)),
    "D": split((F, T), (0, 1)),
}

HULL = "convex_hull"
EXACT = [
    (AUC(), {"A": Fraction(1, 3), "B": Fraction(2, 3), "C": 1, "D": 0}),
    (AUC(kind=HULL), {"A": Fraction(7, 12), "B": Fraction(5, 6), "C": 1, "D": Fraction(1, 2)}),
    (
        AUC(min_fpr=0.25, max_fpr=0.75, kind=HULL),
        {"A": Fraction(5, 8), "B": Fraction(167, 192), "C": 1, "D": Fraction(1, 2)},
    ),
    (MCC(), {"A": Fraction(1, 6), "B": math.sqrt(3 / 8), "C": 1, "D": 0}),
    (TPR(min_tnr=0.25), {"A": Fraction(2, 3), "B": 1, "C": 1, "D": 0}),
    (
        TPR(max_fpr=0.25, kind=HULL),
        {"A": Fraction(1, 3), "B": Fraction(11, 16), "C": 1, "D": Fraction(1, 4)},
    ),
    (TNR(min_tpr=0.25), {"A": Fraction(1, 2), "B": 1, "C": 1, "D": 0}),
    (
        TNR(max_fnr=0.25, kind=HULL),
        {"A": Fraction(3, 8), "B": Fraction(2, 3), "C": 1, "D": Fraction(1, 4)},
    ),
]

ALL_METRICS: list[Metric] = [
    AUC(),
    AUC(kind=HULL),
    AUC(max_fpr=0.2),
    AUC(min_fpr=0.25, max_fpr=0.75, kind=HULL),
    TPR(max_fpr=0.05),
    TPR(min_tnr=0.7),
    TPR(max_fpr=0.3, kind=HULL),
    TNR(min_tpr=0.95),
    TNR(max_fnr=0.4),
    TNR(min_tpr=0.6, kind=HULL),
    MCC(),
    AUPR(),
    AUPR(positive="ind"),
    DetectionError(),
]


# --------------------------------------------------------------------------- strategies


@st.composite
def score_sets(
    draw: st.DrawFn, unique: bool = False, max_size: int = 14
) -> tuple[np.ndarray, np.ndarray]:
    """(conf_ind, conf_ood), both non-empty; quarter-integers (exact under the transforms)."""
    n = draw(st.integers(2, max_size))
    ints = st.integers(-1000, 1000) if unique else st.integers(-8, 8)
    vals = draw(st.lists(ints, min_size=n, max_size=n, unique=unique))
    k = draw(st.integers(1, n - 1))
    arr = np.asarray(vals, dtype=float) / 4
    return arr[:k], arr[k:]


def is_ood_and_conf(ind: np.ndarray, ood: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.r_[np.zeros(ind.size, bool), np.ones(ood.size, bool)], np.r_[ind, ood]


def attainable(ind: np.ndarray, ood: np.ndarray) -> list[tuple[int, int]]:
    """All (FP, TP) reachable by 'flag OoD when conf <= t' (brute force)."""
    ts = np.r_[-np.inf, np.unique(np.r_[ind, ood])]
    return [(int((ind <= t).sum()), int((ood <= t).sum())) for t in ts]


def brute_pareto(ind: np.ndarray, ood: np.ndarray) -> list[tuple[int, int]]:
    pts = set(attainable(ind, ood))
    front = {p for p in pts if not any(q != p and q[0] <= p[0] and q[1] >= p[1] for q in pts)}
    return sorted(front | {(0, 0), (ind.size, ood.size)})


# --------------------------------------------------------------------------- ROC


def test_roc_required_example() -> None:
    roc = ROC(*split((F, T, F, T, T, F, T), (0, 1, 2, 4, 4, 5, 6)), name="ex")
    assert (roc.n_ind, roc.n_ood) == (3, 4)
    assert roc.pareto.tolist() == [[0, 0], [1, 1], [2, 3], [3, 4]]
    assert roc.pareto.dtype.kind == "i"
    assert roc.thresholds.tolist() == [[-np.inf, 0], [1, 2], [4, 5], [6, np.inf]]
    assert roc.convex_hull.tolist() == [[0, 0], [2, 3], [3, 4]]
    np.testing.assert_allclose(roc.fpr, [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(roc.tpr, [0, 1 / 4, 3 / 4, 1])
    assert "n_ind=3" in repr(roc) and "'ex'" in repr(roc)


def test_roc_endpoints_kept_even_if_dominated() -> None:
    roc = ROC(*EXAMPLES["B"])
    # (0, 0) is dominated by (0, 1) and (3, 2) by (2, 2), but the front spans the whole ROC.
    assert roc.pareto.tolist() == [[0, 0], [0, 1], [2, 2], [3, 2]]
    # the last point needs every InD sample flagged: t >= max confidence overall (an InD one).
    assert roc.thresholds.tolist() == [[-np.inf, 0], [0, 1], [3, 4], [4, np.inf]]
    assert roc.convex_hull.tolist() == [[0, 0], [0, 1], [2, 2], [3, 2]]


@PROPS
@given(score_sets())
def test_roc_matches_brute_force(data: tuple[np.ndarray, np.ndarray]) -> None:
    ind, ood = data
    roc = ROC(ind, ood)
    assert [tuple(p) for p in roc.pareto.tolist()] == brute_pareto(ind, ood)
    # every threshold in [low, high) realises its point (checked at low and just below high)
    for (fp, tp), (low, high) in zip(roc.pareto.tolist(), roc.thresholds.tolist(), strict=True):
        probes = [t for t in (low, np.nextafter(high, -np.inf)) if np.isfinite(t)]
        for t in probes:
            assert ((ind <= t).sum(), (ood <= t).sum()) == (fp, tp)
    # hull: vertices from the front, strictly concave, every front point on or below it
    hull = roc.convex_hull
    assert {tuple(v) for v in hull.tolist()} <= {tuple(p) for p in roc.pareto.tolist()}
    assert hull[0].tolist() == [0, 0] and hull[-1].tolist() == [roc.n_ind, roc.n_ood]
    o, a, b = hull[:-2], hull[1:-1], hull[2:]
    cross = (a[:, 0] - o[:, 0]) * (b[:, 1] - o[:, 1]) - (a[:, 1] - o[:, 1]) * (b[:, 0] - o[:, 0])
    assert (cross < 0).all()
    for x, y in roc.pareto.tolist():
        k = np.searchsorted(hull[:, 0], x, side="right") - 1
        if k < len(hull) - 1 and hull[k + 1, 0] > hull[k, 0]:
            (x0, y0), (x1, y1) = hull[k], hull[k + 1]
            assert y * (x1 - x0) <= y0 * (x1 - x0) + (y1 - y0) * (x - x0)
        else:
            assert y <= hull[k, 1]


def test_upper_hull_many_passes_fallback() -> None:
    # Concave arc (slopes k, k-1, ..., 1) then a steep last jump (slope k^2): vectorised pruning
    # drops one arc point per pass, so the monotone-chain fallback has to finish the job.
    k = 80
    ind, ood = [], []
    for j in range(1, k + 1):
        ind.append(2.0 * j)
        ood.extend([2.0 * j + 1] * (k - j + 1))
    ind.append(2.0 * k + 2)
    ood.extend([2.0 * k + 3] * k**2)
    roc = ROC(ind, ood)
    assert len(roc.pareto) == k + 2
    assert roc.convex_hull.tolist() == [[0, 0], [k + 1, k * (k + 1) // 2 + k**2]]


def test_roc_from_counts_equals_constructor() -> None:
    ind, ood = EXAMPLES["A"]
    a = ROC(ind, ood)
    b = ROC.from_counts([0, 1, 2, 3], [1, 0, 0, 1], [0, 1, 1, 1])
    assert a.pareto.tolist() == b.pareto.tolist()
    assert a.thresholds.tolist() == b.thresholds.tolist()
    with pytest.raises(ValueError, match="strictly increasing"):
        ROC.from_counts([1, 0], [1, 0], [0, 1])


def test_roc_large_input_matches_the_gaussian_closed_form() -> None:
    # speed on this size is measured by benchmarks/bench_metrics.py, not asserted here
    rng = np.random.default_rng(0)
    ind, ood = rng.normal(1, 1, 500_000), rng.normal(0, 1, 500_000)
    roc = ROC(ind, ood)
    hull_auc = AUC(kind=HULL).from_roc(roc)
    auc = AUC().from_roc(roc)
    assert auc == pytest.approx(0.7602, abs=2e-3)  # Phi(1 / sqrt(2))
    assert auc <= hull_auc <= auc + 2e-3


# --------------------------------------------------------------------------- exact values


@pytest.mark.parametrize(("metric", "expected"), EXACT, ids=[repr(m) for m, _ in EXACT])
@pytest.mark.parametrize("example", ["A", "B", "C", "D"])
def test_required_exact_values(metric: Metric, expected: dict, example: str) -> None:
    ind, ood = EXAMPLES[example]
    assert metric(ind, ood) == pytest.approx(float(expected[example]), abs=1e-12)


def test_other_metrics_exact_values() -> None:
    ind, ood = EXAMPLES["A"]
    # A: Pareto (0,0),(1,2),(2,3), n_ind=2, n_ood=3: best TPR-FPR = 2/3-1/2.
    assert DetectionError()(ind, ood) == pytest.approx(0.5 * (1 + 2 / 3 - 1 / 2))
    # groups by confidence: 0:I, 1:O, 2:O, 3:IO -> precision 1/2, 2/3, 3/5 at each OoD group
    assert AUPR()(ind, ood) == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)
    assert AUPR(positive="ind")(ind, ood) == pytest.approx((2 / 4 + 2 / 5) / 2)
    assert TNR(min_tpr=0.95)(ind, ood) == 0.0
    assert TPR(max_fpr=0.5)(ind, ood) == pytest.approx(2 / 3)


def test_rate_thresholds_robust_to_float_rounding() -> None:
    # 1 - 0.95 != 0.05 in floating point; both must select the point at exactly FPR 5/100.
    ind = np.arange(100, dtype=float)
    ood = np.r_[np.arange(5) + 0.5, np.full(95, 200.0)]
    assert TPR(max_fpr=0.05)(ind, ood) == pytest.approx(0.05)
    assert TPR(min_tnr=0.95)(ind, ood) == pytest.approx(0.05)
    assert TNR(min_tpr=0.05)(ind, ood) == pytest.approx(0.95)
    assert TNR(max_fnr=0.95)(ind, ood) == pytest.approx(0.95)


# --------------------------------------------------------------------------- properties


@PROPS
@given(score_sets(unique=True, max_size=30))
def test_pessimistic_auc_equals_sklearn_without_ties(data: tuple[np.ndarray, np.ndarray]) -> None:
    ind, ood = data
    is_ood, conf = is_ood_and_conf(ind, ood)
    assert AUC()(ind, ood) == pytest.approx(roc_auc_score(is_ood, -conf), abs=1e-12)


@PROPS
@given(score_sets())
def test_auc_ordering_with_ties(data: tuple[np.ndarray, np.ndarray]) -> None:
    ind, ood = data
    is_ood, conf = is_ood_and_conf(ind, ood)
    sk = roc_auc_score(is_ood, -conf)  # ties counted 1/2
    assert AUC()(ind, ood) <= sk + 1e-12
    assert sk <= AUC(kind=HULL)(ind, ood) + 1e-12
    for m in ALL_METRICS:
        assert 0.0 <= m(ind, ood) <= 1.0


TRANSFORMS = {
    "exp": np.exp,
    "cubic": lambda x: x**3 + x,
    "affine": lambda x: 3.0 * x - 7.0,
    "rank": lambda x: np.unique(x, return_inverse=True)[1].astype(float),
}


@PROPS
@given(score_sets(), st.sampled_from(sorted(TRANSFORMS)))
def test_invariant_under_increasing_transforms(
    data: tuple[np.ndarray, np.ndarray], transform: str
) -> None:
    ind, ood = data
    g = TRANSFORMS[transform]
    both = g(np.r_[ind, ood])
    ind2, ood2 = both[: ind.size], both[ind.size :]
    for m in ALL_METRICS:
        assert m(ind2, ood2) == pytest.approx(m(ind, ood), abs=1e-12), m


@PROPS
@given(score_sets(unique=True))
def test_swap_and_negate_without_ties(data: tuple[np.ndarray, np.ndarray]) -> None:
    ind, ood = data
    auc = AUC()(ind, ood)
    assert AUC()(ood, ind) == pytest.approx(1 - auc, abs=1e-12)  # swap roles
    assert AUC()(-ind, -ood) == pytest.approx(1 - auc, abs=1e-12)  # reverse the ranking
    assert AUC()(-ood, -ind) == pytest.approx(auc, abs=1e-12)  # both: symmetric
    assert AUC(kind=HULL)(-ood, -ind) == pytest.approx(AUC(kind=HULL)(ind, ood), abs=1e-12)


@PROPS
@given(score_sets(), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.6, 0.95, 1.0]))
def test_tpr_tnr_against_brute_force(data: tuple[np.ndarray, np.ndarray], t: float) -> None:
    ind, ood = data
    roc = ROC(ind, ood)
    n, p = ind.size, ood.size
    first = next(i for i, tpr in enumerate(roc.tpr) if tpr >= t)
    assert 1 - TNR(min_tpr=t)(ind, ood) == pytest.approx(roc.fpr[first], abs=1e-12)
    pts = attainable(ind, ood)
    assert TNR(min_tpr=t)(ind, ood) == pytest.approx(
        max(1 - fp / n for fp, tp in pts if tp / p >= t)
    )
    assert TPR(max_fpr=t)(ind, ood) == pytest.approx(
        max([tp / p for fp, tp in pts if fp / n <= t] + [0.0])
    )
    # randomised thresholds can only help
    assert TPR(max_fpr=t, kind=HULL)(ind, ood) >= TPR(max_fpr=t)(ind, ood) - 1e-12
    assert TNR(min_tpr=t, kind=HULL)(ind, ood) >= TNR(min_tpr=t)(ind, ood) - 1e-12
    assert TPR(min_tnr=1 - t)(ind, ood) == pytest.approx(TPR(max_fpr=t)(ind, ood))


@PROPS
@given(score_sets())
def test_mcc_detection_error_aupr_against_sklearn(data: tuple[np.ndarray, np.ndarray]) -> None:
    ind, ood = data
    is_ood, conf = is_ood_and_conf(ind, ood)
    thresholds = np.r_[-np.inf, np.unique(conf)]
    best_mcc = max(matthews_corrcoef(is_ood, conf <= t) for t in thresholds)
    assert MCC()(ind, ood) == pytest.approx(max(0.0, best_mcc), abs=1e-12)
    best_err = min(0.5 * ((ind <= t).mean() + (ood > t).mean()) for t in thresholds)
    assert DetectionError()(ind, ood) == pytest.approx(1 - best_err, abs=1e-12)
    assert AUPR()(ind, ood) == pytest.approx(average_precision_score(is_ood, -conf), abs=1e-12)
    assert AUPR(positive="ind")(ind, ood) == pytest.approx(
        average_precision_score(~is_ood, conf), abs=1e-12
    )


@PROPS
@given(score_sets(), st.floats(0.0, 0.9), st.floats(0.05, 1.0))
def test_partial_auc_window(data: tuple[np.ndarray, np.ndarray], lo: float, width: float) -> None:
    ind, ood = data
    hi = min(1.0, lo + width)
    for kind in ("pessimistic", HULL):
        full = AUC(kind=kind)(ind, ood)
        left = AUC(max_fpr=hi, kind=kind)(ind, ood) * hi
        part = AUC(min_fpr=lo, max_fpr=hi, kind=kind)(ind, ood) * (hi - lo)
        right = AUC(min_fpr=hi, kind=kind)(ind, ood) * (1 - hi) if hi < 1 else 0.0
        assert left + right == pytest.approx(full, abs=1e-9)
        head = AUC(max_fpr=lo, kind=kind)(ind, ood) * lo if lo > 0 else 0.0
        assert head + part == pytest.approx(left, abs=1e-9)


# --------------------------------------------------------------------------- inputs


def test_nan_raises_naming_the_score() -> None:
    ind = np.r_[np.full(997, 1.0), [np.nan] * 3]
    with pytest.raises(ValueError, match=r"NaN in confidences of 'KNN\(k=15\)'") as err:
        AUC()(ind, [0.0, 1.0], name="KNN(k=15)")
    assert "3 of 1000 InD values" in str(err.value)
    with pytest.raises(ValueError, match="1 of 2 OoD values"):
        ROC([1.0], [0.0, np.nan], name="msp")
    with pytest.raises(ValueError, match="'energy'"):
        compute(DEFAULT_METRICS, [np.nan], [1.0], name="energy")
    with pytest.raises(ValueError, match="'energy'"):
        bootstrap(AUC(), [np.nan], [1.0], name="energy")


def test_empty_and_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="no InD"):
        AUC()([], [1.0])
    with pytest.raises(ValueError, match="no OoD"):
        AUC()([1.0], np.array([]))
    with pytest.raises(ValueError, match="1-D"):
        AUC()(np.zeros((2, 2)), [1.0])


def test_infinite_confidences() -> None:
    ind, ood = np.full(5, np.inf), np.array([0.0, 1.0, -3.0])
    for m in (AUC(), AUC(kind=HULL), TPR(max_fpr=0.05), TNR(min_tpr=0.95), MCC(), AUPR()):
        assert m(ind, ood) == 1.0
    assert DetectionError()(ind, ood) == 1.0
    ood = np.array([-np.inf, -np.inf, 2.0])
    ind = np.array([np.inf, 1.0, 3.0])
    assert AUC()(ind, ood) == pytest.approx(8 / 9)  # only OoD 2.0 vs InD 1.0 is misordered
    roc = ROC(ind, ood)
    assert roc.thresholds[0, 0] == -np.inf and roc.thresholds[-1].tolist() == [np.inf, np.inf]
    assert AUC()([np.inf, np.inf], [np.inf]) == 0.0  # one tie: no credit
    assert AUC(kind=HULL)([np.inf, np.inf], [np.inf]) == 0.5


def test_accepts_lists_and_tensors() -> None:
    torch = pytest.importorskip("torch")
    ind, ood = EXAMPLES["B"]
    expected = AUC()(ind, ood)
    assert AUC()(ind.tolist(), ood.tolist()) == expected
    assert AUC()(torch.tensor(ind, requires_grad=True), torch.tensor(ood)) == expected
    assert AUC()(torch.tensor(ind, dtype=torch.bfloat16), torch.tensor(ood)) == expected


# --------------------------------------------------------------------------- metric objects


def test_repr_name_and_hashing() -> None:
    assert repr(AUC(max_fpr=0.2)) == "AUC(max_fpr=0.2)"
    assert repr(AUC()) == "AUC()"
    assert repr(TPR(max_fpr=0.05)) == "TPR(max_fpr=0.05)"
    assert repr(AUPR(positive="ind")) == "AUPR(positive='ind')"
    assert AUC(max_fpr=0.2).name == "AUC(max_fpr=0.2)"
    assert AUC(max_fpr=1) == AUC() and repr(AUC(max_fpr=1)) == "AUC()"
    cache = {AUC(max_fpr=0.2): 1, TPR(max_fpr=0.05): 2}
    assert cache[AUC(max_fpr=0.2)] == 1 and TPR(max_fpr=0.05) in cache
    assert MCC() != DetectionError() and AUC() != AUC(kind=HULL)
    assert all(m.positive == "ood" and m.tie_rule for m in ALL_METRICS if not isinstance(m, AUPR))
    assert AUPR(positive="ind").positive == "ind"
    with pytest.raises(AttributeError):
        AUC().max_fpr = 0.5  # type: ignore[misc]


def test_constructor_validation() -> None:
    for bad in (
        lambda: TPR(),
        lambda: TPR(max_fpr=0.1, min_tnr=0.9),
        lambda: TNR(),
        lambda: TNR(min_tpr=1.5),
        lambda: AUC(min_fpr=0.5, max_fpr=0.5),
        lambda: AUC(kind="optimistic"),
        lambda: AUPR(positive="both"),
        lambda: AUC(max_fpr="0.2"),
    ):
        with pytest.raises(ValueError):
            bad()


def test_defaults_registry_and_compute() -> None:
    assert (AUC(max_fpr=0.2), TPR(max_fpr=0.05), AUC(), TNR(min_tpr=0.95)) == DEFAULT_METRICS
    assert set(METRICS) == {"AUC", "TPR", "TNR", "MCC", "AUPR", "DetectionError"}
    ind, ood = EXAMPLES["A"]
    assert compute(ALL_METRICS, ind, ood) == [m(ind, ood) for m in ALL_METRICS]
    assert compute(["AUC()", MCC()], ind, ood) == [AUC()(ind, ood), MCC()(ind, ood)]


@pytest.mark.parametrize("metric", [*ALL_METRICS, TPR(min_tnr=0.95, kind=HULL)], ids=repr)
def test_parse_metric_round_trip(metric: Metric) -> None:
    assert parse_metric(repr(metric)) == metric


def test_parse_metric_rejects_unsafe_or_invalid() -> None:
    assert parse_metric("MCC") == MCC()
    assert parse_metric(" AUC( max_fpr = 0.2 ) ") == AUC(max_fpr=0.2)
    for text in (
        "__import__('os')",
        "__import__('os').system('echo hi')",
        "AUC(max_fpr=__import__('os'))",
        "AUC(0.2)",
        "AUC(**{'max_fpr': 0.2})",
        "AUC(max_fpr=[0.2])",
        "AUC(max_fpr=0.2",
        "Metric()",
        "AUC(foo=1)",
        "AUC(max_fpr=2.0)",
        "os.system('x')",
    ):
        with pytest.raises(ValueError):
            parse_metric(text)


# --------------------------------------------------------------------------- uncertainty


def _normal_scores(seed: int = 1, n_ind: int = 300, n_ood: int = 200) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 1.0, n_ind), rng.normal(0.0, 1.0, n_ood)


def test_bootstrap_interval() -> None:
    ind, ood = _normal_scores()
    res = bootstrap(AUC(), ind, ood, n_boot=300, seed=3)
    assert isinstance(res, BootstrapResult)
    assert res.value == AUC()(ind, ood)
    assert res.low < res.value < res.high
    assert 0.03 < res.high - res.low < 0.2  # AUC ~0.76 with 300/200 samples: SE ~0.02
    assert (res.level, res.n_boot) == (0.95, 300)
    assert bootstrap(AUC(), ind, ood, n_boot=300, seed=3) == res
    assert bootstrap(AUC(), ind, ood, n_boot=300, seed=4) != res
    narrow = bootstrap(AUC(), ind, ood, n_boot=300, seed=3, level=0.5)
    assert res.low < narrow.low <= narrow.high < res.high


def test_bootstrap_matches_naive_resampling() -> None:
    ind, ood = _normal_scores(n_ind=40, n_ood=30)
    # 50 rows fit in one chunk: InD indices are drawn as one (50, 40) block, then OoD (50, 30)
    rng = np.random.default_rng(7)
    ii, oo = rng.integers(0, 40, size=(50, 40)), rng.integers(0, 30, size=(50, 30))
    naive = [MCC()(ind[i], ood[o]) for i, o in zip(ii, oo, strict=True)]
    res = bootstrap(MCC(), ind, ood, n_boot=50, seed=7, level=0.5)
    assert (res.low, res.high) == pytest.approx(tuple(np.quantile(naive, [0.25, 0.75])))


def test_bootstrap_perfect_separation() -> None:
    ind, ood = np.linspace(1, 2, 50), np.linspace(-2, 0, 40)
    for m in (AUC(), TPR(max_fpr=0.05), TNR(min_tpr=0.95), MCC()):
        res = bootstrap(m, ind, ood, n_boot=100)
        assert (res.value, res.low, res.high) == (1.0, 1.0, 1.0)


def test_paired_test_better_score_wins() -> None:
    ind, ood = _normal_scores(seed=2)
    rng = np.random.default_rng(5)
    noisy_ind, noisy_ood = ind + rng.normal(0, 2, ind.size), ood + rng.normal(0, 2, ood.size)
    res = paired_bootstrap_test(AUC(), (ind, ood), (noisy_ind, noisy_ood), n_boot=300)
    assert isinstance(res, PairedTestResult)
    assert res.delta == pytest.approx(AUC()(ind, ood) - AUC()(noisy_ind, noisy_ood))
    assert res.delta > 0.1 and res.low > 0
    assert res.p_value < 0.05
    assert res.p_value == pytest.approx(1 / 301)
    reverse = paired_bootstrap_test(AUC(), (noisy_ind, noisy_ood), (ind, ood), n_boot=300)
    assert reverse.delta == pytest.approx(-res.delta) and reverse.p_value > 0.95


def test_paired_test_identical_and_mismatched() -> None:
    ind, ood = _normal_scores(seed=3)
    res = paired_bootstrap_test(TPR(max_fpr=0.05), (ind, ood), (ind, ood), n_boot=200, seed=1)
    assert (res.delta, res.low, res.high, res.p_value) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="same samples"):
        paired_bootstrap_test(AUC(), (ind, ood), (ind[:-1], ood))
    with pytest.raises(ValueError, match="'B'"):
        paired_bootstrap_test(AUC(), (ind, ood), (ind, np.r_[ood[:-1], np.nan]))
