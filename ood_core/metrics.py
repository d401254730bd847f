"""Discriminative-power metrics for out-of-distribution (OoD) detection.

Conventions (shared by every class and function in this module):

* Inputs are ``conf_ind`` (1-D confidences of in-distribution samples) and ``conf_ood``
  (1-D confidences of OoD samples). **Higher confidence = more in-distribution.** NumPy arrays,
  lists and torch tensors are accepted; values are converted to float64.
* Detection rule: a sample is flagged OoD when ``confidence <= threshold``. In ROC terms
  **OoD is the positive class**: TP = flagged OoD samples, FP = flagged InD samples,
  ``TPR = TP / n_ood``, ``FPR = FP / n_ind``, ``TNR = 1 - FPR``, ``FNR = 1 - TPR``.
* NaN confidences raise ``ValueError`` naming the score (``name`` argument); +/-inf are allowed.
  Empty InD or OoD inputs raise ``ValueError``.
* Every metric value lies in [0, 1] and **higher is better**.
* Ties: an InD/OoD tie cannot be split by a deterministic threshold. ``kind="pessimistic"``
  metrics use only attainable operating points (the Pareto front of the ROC) and give tied
  groups no credit; ``kind="convex_hull"`` metrics also allow randomised thresholds, i.e. they
  interpolate linearly between vertices of the ROC convex hull.
"""

from __future__ import annotations

import ast
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, ClassVar, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from ood_core.registry import Registry

__all__ = [
    "AUC",
    "AUPR",
    "DEFAULT_METRICS",
    "plain_metric_name",
    "METRICS",
    "MCC",
    "ROC",
    "TNR",
    "TPR",
    "BootstrapResult",
    "DetectionError",
    "Metric",
    "PairedTestResult",
    "bootstrap",
    "compute",
    "paired_bootstrap_test",
    "parse_metric",
]

#: Anything convertible to a 1-D float array: numpy array, list, torch tensor, ...
Confidences: TypeAlias = Any
Kind: TypeAlias = Literal["pessimistic", "convex_hull"]
_KINDS: tuple[str, ...] = ("pessimistic", "convex_hull")
_FArray: TypeAlias = npt.NDArray[np.float64]
_IArray: TypeAlias = npt.NDArray[np.int64]


# --------------------------------------------------------------------------- input handling


def _as_float_array(x: Confidences) -> _FArray:
    """Convert ``x`` (array, list, torch tensor) to a float64 numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        try:
            return np.asarray(x, dtype=np.float64)
        except TypeError:  # e.g. bfloat16 tensors have no numpy equivalent
            return np.asarray(x.double(), dtype=np.float64)
    return np.asarray(x, dtype=np.float64)


def _validate(conf_ind: Confidences, conf_ood: Confidences, name: str) -> tuple[_FArray, _FArray]:
    """Return float64 1-D copies of the inputs; raise ``ValueError`` on NaN, empty or non-1-D."""
    ind, ood = _as_float_array(conf_ind), _as_float_array(conf_ood)
    for arr, label in ((ind, "InD"), (ood, "OoD")):
        if arr.ndim != 1:
            raise ValueError(f"{label} confidences of {name!r} must be 1-D, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"no {label} confidences given for {name!r}: need at least one")
    parts = [
        f"{k} of {arr.size} {label} values"
        for arr, label in ((ind, "InD"), (ood, "OoD"))
        if (k := int(np.count_nonzero(np.isnan(arr))))
    ]
    if parts:
        raise ValueError(
            f"NaN in confidences of {name!r} ({', '.join(parts)}): every sample needs a "
            "real-valued confidence (+/-inf are allowed); fix the score or drop these samples"
        )
    return ind, ood


def _group(ind: _FArray, ood: _FArray) -> tuple[_FArray, _IArray, _IArray]:
    """Sorted unique confidences and, for each InD/OoD sample, the index of its value."""
    values, inverse = np.unique(np.concatenate([ind, ood]), return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64, copy=False)
    return values, inverse[: ind.size], inverse[ind.size :]


# --------------------------------------------------------------------------- ROC


def _upper_hull(points: _IArray) -> _IArray:
    """Vertices of the upper convex hull of x-sorted integer points (collinear points dropped).

    Vectorised pruning: a point on or below the chord of its two neighbours is not a hull vertex,
    so all such points can be dropped at once; repeat until none is left. A monotone chain
    finishes the (rare) inputs that need many passes.
    """
    pts = points
    for _ in range(64):
        if len(pts) <= 2:
            return pts
        o, a, b = pts[:-2], pts[1:-1], pts[2:]
        cross = (a[:, 0] - o[:, 0]) * (b[:, 1] - o[:, 1]) - (a[:, 1] - o[:, 1]) * (
            b[:, 0] - o[:, 0]
        )
        drop = cross >= 0
        if not drop.any():
            return pts
        keep = np.ones(len(pts), dtype=bool)
        keep[1:-1] = ~drop
        pts = pts[keep]
    hull: list[tuple[int, int]] = []
    for x, y in pts.tolist():
        while len(hull) >= 2:
            (ox, oy), (ax, ay) = hull[-2], hull[-1]
            if (ax - ox) * (y - oy) - (ay - oy) * (x - ox) < 0:
                break
            hull.pop()
        hull.append((x, y))
    return np.asarray(hull, dtype=np.int64).reshape(-1, 2)


class ROC:
    """ROC of a confidence score, OoD = positive class, flag OoD when ``confidence <= t``.

    Attributes:
        name: the score's name (used in error messages).
        n_ind, n_ood: numbers of InD / OoD samples.
        pareto: int array (m, 2) of the attainable (FP, TP) count points that are not dominated
            (no other attainable point has FP' <= FP and TP' >= TP), sorted increasingly, always
            starting at (0, 0) and ending at (n_ind, n_ood) even where those are dominated.
        thresholds: float array (m, 2); row i is the interval [low, high) of thresholds t that
            realise ``pareto[i]``. The first is (-inf, min confidence), the last is
            (max confidence, inf) (the max over InD and OoD: all InD must be flagged too).
            A -inf minimum makes the first interval empty; a +inf maximum needs t = +inf.
        convex_hull: int array (k, 2), vertices of the upper convex hull of ``pareto``
            (collinear points dropped), from (0, 0) to (n_ind, n_ood). Computed lazily.
        fpr, tpr: float arrays, ``pareto`` as rates. ``hull_fpr``/``hull_tpr``: same for the hull.
        values, ind_counts, ood_counts: sorted unique confidences and the InD/OoD count at each.
    """

    name: str
    n_ind: int
    n_ood: int
    values: _FArray
    ind_counts: _IArray
    ood_counts: _IArray
    pareto: _IArray
    thresholds: _FArray
    fpr: _FArray
    tpr: _FArray

    def __init__(
        self, conf_ind: Confidences, conf_ood: Confidences, name: str = "confidence"
    ) -> None:
        ind, ood = _validate(conf_ind, conf_ood, name)
        values, inv_ind, inv_ood = _group(ind, ood)
        self._build(
            values,
            np.bincount(inv_ind, minlength=values.size),
            np.bincount(inv_ood, minlength=values.size),
            name,
        )

    @classmethod
    def from_counts(
        cls,
        values: npt.ArrayLike,
        ind_counts: npt.ArrayLike,
        ood_counts: npt.ArrayLike,
        name: str = "confidence",
    ) -> ROC:
        """Build from strictly increasing confidence ``values`` and InD/OoD counts at each."""
        v = np.asarray(values, dtype=np.float64)
        ic = np.asarray(ind_counts, dtype=np.int64)
        oc = np.asarray(ood_counts, dtype=np.int64)
        if v.ndim != 1 or ic.shape != v.shape or oc.shape != v.shape:
            raise ValueError("values, ind_counts and ood_counts must be 1-D of equal length")
        if np.isnan(v).any() or (np.diff(v) <= 0).any():
            raise ValueError(f"values of {name!r} must be strictly increasing and not NaN")
        if (ic < 0).any() or (oc < 0).any():
            raise ValueError("counts must be non-negative")
        if ic.sum() == 0 or oc.sum() == 0:
            raise ValueError(f"no InD or no OoD samples given for {name!r}: need at least one")
        return cls._unchecked(v, ic, oc, name)

    @classmethod
    def _unchecked(
        cls, values: _FArray, ind_counts: _IArray, ood_counts: _IArray, name: str
    ) -> ROC:
        roc = cls.__new__(cls)
        roc._build(values, ind_counts, ood_counts, name)
        return roc

    def _build(self, values: _FArray, ind_counts: _IArray, ood_counts: _IArray, name: str) -> None:
        present = (ind_counts > 0) | (ood_counts > 0)
        if not present.all():
            values, ind_counts, ood_counts = (
                values[present],
                ind_counts[present],
                ood_counts[present],
            )
        self.name = name
        self.values = values
        self.ind_counts = ind_counts.astype(np.int64, copy=False)
        self.ood_counts = ood_counts.astype(np.int64, copy=False)
        # cumulative counts after the first j groups (j = 0..u): threshold t in [v[j-1], v[j])
        cum_fp = np.concatenate(([0], np.cumsum(self.ind_counts)))
        cum_tp = np.concatenate(([0], np.cumsum(self.ood_counts)))
        u = values.size
        self.n_ind, self.n_ood = int(cum_fp[-1]), int(cum_tp[-1])
        # A point can only be Pareto if the next group adds false positives (else raising the
        # threshold is free); among those, keep the first of each run of equal TP.
        cand = np.flatnonzero(self.ind_counts > 0)
        idx = np.concatenate(([0], cand[cand > 0], [u]))
        tp = cum_tp[idx]
        keep = np.ones(idx.size, dtype=bool)
        keep[1:-1] = tp[1:-1] > tp[:-2]
        idx = idx[keep]
        self.pareto = np.column_stack((cum_fp[idx], cum_tp[idx])).astype(np.int64, copy=False)
        ext = np.concatenate(([-np.inf], values, [np.inf]))
        self.thresholds = np.column_stack((ext[idx], ext[idx + 1]))
        self.fpr = self.pareto[:, 0] / self.n_ind
        self.tpr = self.pareto[:, 1] / self.n_ood

    @cached_property
    def convex_hull(self) -> _IArray:
        """Vertices (FP, TP) of the upper convex hull of the Pareto front."""
        return _upper_hull(self.pareto)

    @cached_property
    def hull_fpr(self) -> _FArray:
        """FPR of the convex-hull vertices."""
        return self.convex_hull[:, 0] / self.n_ind

    @cached_property
    def hull_tpr(self) -> _FArray:
        """TPR of the convex-hull vertices."""
        return self.convex_hull[:, 1] / self.n_ood

    def __repr__(self) -> str:
        return (
            f"ROC(name={self.name!r}, n_ind={self.n_ind}, n_ood={self.n_ood}, "
            f"pareto_points={len(self.pareto)}, distinct_values={self.values.size})"
        )


# --------------------------------------------------------------------------- helpers


def _check_rate(value: Any, field: str, cls: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ValueError(f"{cls}: {field} must be a number, got {value!r}")
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{cls}: {field} must be in [0, 1], got {value!r}")
    return v


def _check_kind(kind: Any, cls: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"{cls}: kind must be one of {_KINDS}, got {kind!r}")


def _exactly_one(obj: Metric, a: str, b: str) -> None:
    cls = type(obj).__name__
    va, vb = getattr(obj, a), getattr(obj, b)
    if (va is None) == (vb is None):
        raise ValueError(f"{cls}: give exactly one of {a}= and {b}=, got {a}={va!r}, {b}={vb!r}")
    field = a if va is not None else b
    object.__setattr__(obj, field, _check_rate(getattr(obj, field), field, cls))


def _count_floor(rate: float, n: int) -> int:
    """Largest count c with c / n <= rate, tolerant to float rounding in ``rate``."""
    return min(n, math.floor(rate * n * (1 + 1e-10) + 1e-10))


def _count_ceil(rate: float, n: int) -> int:
    """Smallest count c with c / n >= rate, tolerant to float rounding in ``rate``."""
    return max(0, math.ceil(rate * n * (1 - 1e-10) - 1e-10))


def _pct(rate: float) -> str:
    """``0.05`` -> ``"5%"``, ``0.955`` -> ``"95.5%"``."""
    return f"{100 * rate:.10g}%"


def plain_metric_name(text: str) -> str:
    """:attr:`Metric.plain_name` of a metric label (``"AUC()"`` -> ``"AUROC"``); the label
    itself when it is not one :func:`parse_metric` reads."""
    try:
        return parse_metric(text).plain_name
    except (ValueError, TypeError, KeyError):
        return text


def _clip01(x: float) -> float:
    return float(min(1.0, max(0.0, x)))


def _hull_tpr_at(fx: _FArray, ty: _FArray, fpr: float) -> float:
    """Hull TPR at ``fpr`` (upper value on the vertical segment at FPR 0)."""
    k = int(np.searchsorted(fx, fpr, side="right")) - 1
    if k >= len(fx) - 1:
        return float(ty[-1])
    return float(ty[k] + (ty[k + 1] - ty[k]) * (fpr - fx[k]) / (fx[k + 1] - fx[k]))


def _hull_fpr_at(fx: _FArray, ty: _FArray, tpr: float) -> float:
    """Smallest hull FPR with TPR >= ``tpr``."""
    k = int(np.searchsorted(ty, tpr, side="left"))
    if k == 0:
        return float(fx[0])
    k = min(k, len(ty) - 1)
    return float(fx[k - 1] + (fx[k] - fx[k - 1]) * (tpr - ty[k - 1]) / (ty[k] - ty[k - 1]))


def _hull_area(x: _FArray, y: _FArray, a: float, b: float) -> float:
    """Integral over [a, b] of the piecewise-linear curve through (x, y)."""
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    width = x1 - x0
    lo, hi = np.maximum(x0, a), np.minimum(x1, b)
    ok = (hi > lo) & (width > 0)
    slope = np.divide(y1 - y0, width, out=np.zeros_like(width), where=width > 0)
    trap = (hi - lo) * (2 * y0 + slope * (lo - x0 + hi - x0)) / 2
    return float(np.sum(trap, where=ok))


# --------------------------------------------------------------------------- metrics


METRICS: Registry = Registry("metric")
"""Metric class name -> class, filled by ``@METRICS.register``."""


@dataclass(frozen=True, repr=False)
class Metric(ABC):
    """A discriminative-power metric: value in [0, 1], higher is better, OoD = positive class.

    Instances are immutable, hashable and compare by their parameters (usable as cache keys);
    ``repr`` shows only non-default parameters, e.g. ``AUC(max_fpr=0.2)``, and round-trips
    through :func:`parse_metric`.
    """

    positive: ClassVar[str] = "ood"
    tie_rule: ClassVar[str] = ""

    @abstractmethod
    def from_roc(self, roc: ROC) -> float:
        """Evaluate the metric on a precomputed :class:`ROC`."""

    def __call__(
        self, conf_ind: Confidences, conf_ood: Confidences, name: str = "confidence"
    ) -> float:
        """Evaluate on InD / OoD confidences (higher = more InD); NaN raises naming ``name``."""
        return self.from_roc(ROC(conf_ind, conf_ood, name=name))

    @property
    def name(self) -> str:
        """Display name, identical to ``repr``."""
        return repr(self)

    @property
    def plain_name(self) -> str:
        """The name a reader knows (``"AUROC"`` for ``AUC()``, ``"TNR at 95% TPR"`` for
        ``TNR(min_tpr=0.95)``); the formal :attr:`name` stays the key everywhere."""
        return self.name

    def __repr__(self) -> str:
        args = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != f.default
        )
        return f"{type(self).__name__}({args})"


_STEP_TIES = (
    "pessimistic: only attainable (deterministic) thresholds; a tied InD/OoD group earns no "
    "credit. convex_hull: randomised thresholds allowed (linear interpolation between ROC "
    "convex-hull vertices)."
)


@METRICS.register
@dataclass(frozen=True, repr=False)
class AUC(Metric):
    """Area under the ROC curve on the FPR window [min_fpr, max_fpr], divided by its width.

    OoD is the positive class; flag OoD when confidence <= threshold. The partial area is
    normalised by ``max_fpr - min_fpr`` only (NOT McClish-standardised), so a random score gets
    about ``(min_fpr + max_fpr) / 2`` and a perfect one gets 1.

    ``kind="pessimistic"``: the ROC is a step function through the Pareto points, going
    horizontally first, then vertically, so tied groups get no credit; without ties this equals
    ``sklearn.metrics.roc_auc_score(is_ood, -conf)``. ``kind="convex_hull"``: linear
    interpolation between convex-hull vertices (an upper bound, attainable with randomised
    thresholds).
    """

    max_fpr: float = 1.0
    min_fpr: float = 0.0
    kind: Kind = "pessimistic"

    tie_rule: ClassVar[str] = _STEP_TIES

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_fpr", _check_rate(self.max_fpr, "max_fpr", "AUC"))
        object.__setattr__(self, "min_fpr", _check_rate(self.min_fpr, "min_fpr", "AUC"))
        if not self.min_fpr < self.max_fpr:
            raise ValueError(
                f"AUC: need min_fpr < max_fpr, got min_fpr={self.min_fpr}, max_fpr={self.max_fpr}"
            )
        _check_kind(self.kind, "AUC")

    @property
    def plain_name(self) -> str:
        hull = " (convex hull)" if self.kind != "pessimistic" else ""
        if self.min_fpr == 0 and self.max_fpr == 1:
            return f"AUROC{hull}"
        if self.min_fpr == 0:
            return f"partial AUROC, FPR <= {_pct(self.max_fpr)}{hull}"
        return f"partial AUROC, FPR {_pct(self.min_fpr)} to {_pct(self.max_fpr)}{hull}"

    def from_roc(self, roc: ROC) -> float:
        a, b = self.min_fpr, self.max_fpr
        if self.kind == "pessimistic":
            x = np.clip(roc.fpr, a, b)
            area = float(np.sum(roc.tpr[:-1] * np.diff(x)))
        else:
            area = _hull_area(roc.hull_fpr, roc.hull_tpr, a, b)
        return _clip01(area / (b - a))


@METRICS.register
@dataclass(frozen=True, repr=False)
class TPR(Metric):
    """Best TPR (fraction of OoD flagged) attainable with FPR <= max_fpr.

    Give exactly one of ``max_fpr`` or ``min_tnr`` (= 1 - max_fpr). OoD is the positive class;
    flag OoD when confidence <= threshold. ``kind="pessimistic"``: best over attainable
    (Pareto) points. ``kind="convex_hull"``: interpolated on the ROC convex hull (randomised
    thresholds).
    """

    max_fpr: float | None = None
    min_tnr: float | None = None
    kind: Kind = "pessimistic"

    tie_rule: ClassVar[str] = _STEP_TIES

    def __post_init__(self) -> None:
        _exactly_one(self, "max_fpr", "min_tnr")
        _check_kind(self.kind, "TPR")

    @property
    def fpr_limit(self) -> float:
        """The FPR constraint, ``max_fpr`` or ``1 - min_tnr``."""
        return self.max_fpr if self.max_fpr is not None else 1.0 - float(self.min_tnr or 0.0)

    @property
    def plain_name(self) -> str:
        hull = " (convex hull)" if self.kind != "pessimistic" else ""
        return f"TPR at {_pct(self.fpr_limit)} FPR{hull}"

    def from_roc(self, roc: ROC) -> float:
        f = self.fpr_limit
        if self.kind == "pessimistic":
            cap = _count_floor(f, roc.n_ind)
            i = int(np.searchsorted(roc.pareto[:, 0], cap, side="right")) - 1
            return _clip01(roc.tpr[i])
        return _clip01(_hull_tpr_at(roc.hull_fpr, roc.hull_tpr, f))


@METRICS.register
@dataclass(frozen=True, repr=False)
class TNR(Metric):
    """Best TNR (fraction of InD kept) attainable with TPR >= min_tpr.

    Give exactly one of ``min_tpr`` or ``max_fnr`` (= 1 - min_tpr). OoD is the positive class;
    flag OoD when confidence <= threshold. The classical "FPR@95TPR" is
    ``1 - TNR(min_tpr=0.95)``. ``kind="pessimistic"``: best over attainable (Pareto) points.
    ``kind="convex_hull"``: interpolated on the ROC convex hull (randomised thresholds).
    """

    min_tpr: float | None = None
    max_fnr: float | None = None
    kind: Kind = "pessimistic"

    tie_rule: ClassVar[str] = _STEP_TIES

    def __post_init__(self) -> None:
        _exactly_one(self, "min_tpr", "max_fnr")
        _check_kind(self.kind, "TNR")

    @property
    def tpr_limit(self) -> float:
        """The TPR constraint, ``min_tpr`` or ``1 - max_fnr``."""
        return self.min_tpr if self.min_tpr is not None else 1.0 - float(self.max_fnr or 0.0)

    @property
    def plain_name(self) -> str:
        hull = " (convex hull)" if self.kind != "pessimistic" else ""
        return f"TNR at {_pct(self.tpr_limit)} TPR{hull}"

    def from_roc(self, roc: ROC) -> float:
        t = self.tpr_limit
        if self.kind == "pessimistic":
            need = _count_ceil(t, roc.n_ood)
            i = int(np.searchsorted(roc.pareto[:, 1], need, side="left"))
            return _clip01(1.0 - roc.fpr[i])
        return _clip01(1.0 - _hull_fpr_at(roc.hull_fpr, roc.hull_tpr, t))


@METRICS.register
@dataclass(frozen=True, repr=False)
class MCC(Metric):
    """Best Matthews correlation coefficient over attainable thresholds, clipped below at 0.

    OoD is the positive class; flag OoD when confidence <= threshold. The maximum is taken over
    the Pareto points (dominated points never have a higher positive MCC); an undefined MCC
    (everything flagged or nothing flagged) counts as 0.
    """

    tie_rule: ClassVar[str] = "deterministic thresholds only: a tied group is flagged as a whole"

    @property
    def plain_name(self) -> str:
        return "MCC at the best threshold"

    def from_roc(self, roc: ROC) -> float:
        fp = roc.pareto[:, 0].astype(np.float64)
        tp = roc.pareto[:, 1].astype(np.float64)
        n, p = float(roc.n_ind), float(roc.n_ood)
        num = tp * (n - fp) - fp * (p - tp)
        den = np.sqrt((tp + fp) * (n + p - tp - fp) * n * p)
        mcc = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        return _clip01(float(mcc.max()))


@METRICS.register
@dataclass(frozen=True, repr=False)
class AUPR(Metric):
    """Average precision with ``positive`` ("ood" or "ind") as the positive class.

    Same semantics as ``sklearn.metrics.average_precision_score``: for ``positive="ood"`` the
    ranking score is ``-confidence`` (flag OoD when confidence <= threshold); for
    ``positive="ind"`` it is the confidence itself. A random score gets about the positive
    class's prevalence.
    """

    positive: Literal["ood", "ind"] = "ood"  # type: ignore[misc]

    tie_rule: ClassVar[str] = "as sklearn average_precision_score: a tied group is one point"

    def __post_init__(self) -> None:
        if self.positive not in ("ood", "ind"):
            raise ValueError(f"AUPR: positive must be 'ood' or 'ind', got {self.positive!r}")

    @property
    def plain_name(self) -> str:
        return "AUPR, OoD positive" if self.positive == "ood" else "AUPR, InD positive"

    def from_roc(self, roc: ROC) -> float:
        if self.positive == "ood":
            pos, neg, n_pos = roc.ood_counts, roc.ind_counts, roc.n_ood
        else:
            pos, neg, n_pos = roc.ind_counts[::-1], roc.ood_counts[::-1], roc.n_ind
        tp, fp = np.cumsum(pos), np.cumsum(neg)
        return _clip01(float(np.sum(pos * (tp / (tp + fp)))) / n_pos)


@METRICS.register
@dataclass(frozen=True, repr=False)
class DetectionError(Metric):
    """``1 - min_t 0.5 * (FPR + FNR)`` over attainable thresholds, so that higher is better.

    OoD is the positive class; flag OoD when confidence <= threshold. The classical detection
    error (lower is better, at most 0.5) is ``1 - DetectionError()(...)``; this value is in
    [0.5, 1]. The minimum is taken over the Pareto points.
    """

    tie_rule: ClassVar[str] = "deterministic thresholds only: a tied group is flagged as a whole"

    @property
    def plain_name(self) -> str:
        return "detection error"

    def from_roc(self, roc: ROC) -> float:
        return _clip01(0.5 * (1.0 + float(np.max(roc.tpr - roc.fpr))))


DEFAULT_METRICS: tuple[Metric, ...] = (
    AUC(max_fpr=0.2),
    TPR(max_fpr=0.05),
    AUC(),
    TNR(min_tpr=0.95),
)


def parse_metric(text: str) -> Metric:
    """Parse ``"AUC(max_fpr=0.2)"`` (or a bare ``"AUC"``) into a metric, safely.

    Only registry classes (:data:`METRICS`) called with keyword literals (numbers, strings,
    None, booleans) are accepted; anything else raises ``ValueError``.
    """
    if not isinstance(text, str) or len(text) > 500:
        raise ValueError(f"not a metric specification: {text!r}")
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as err:
        raise ValueError(f"cannot parse metric {text!r}: {err.msg}") from None
    call = node if isinstance(node, ast.Call) else None
    func = call.func if call is not None else node
    if not isinstance(func, ast.Name) or func.id not in METRICS:
        raise ValueError(
            f"cannot parse metric {text!r}: expected one of {sorted(METRICS)}, "
            "e.g. 'AUC(max_fpr=0.2)'"
        )
    kwargs: dict[str, Any] = {}
    if call is not None:
        if call.args:
            raise ValueError(f"cannot parse metric {text!r}: use keyword arguments only")
        for kw in call.keywords:
            if kw.arg is None:
                raise ValueError(f"cannot parse metric {text!r}: '**' is not allowed")
            try:
                value = ast.literal_eval(kw.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                raise ValueError(
                    f"cannot parse metric {text!r}: {kw.arg}= must be a literal"
                ) from None
            if value is not None and not isinstance(value, bool | int | float | str):
                raise ValueError(
                    f"cannot parse metric {text!r}: {kw.arg}= must be a number, string or None"
                )
            kwargs[kw.arg] = value
    try:
        return METRICS[func.id](**kwargs)
    except TypeError as err:
        raise ValueError(f"cannot parse metric {text!r}: {err}") from None


def compute(
    metrics: Sequence[Metric | str],
    conf_ind: Confidences,
    conf_ood: Confidences,
    name: str = "confidence",
) -> list[float]:
    """Evaluate several metrics (or their string specs) on one shared :class:`ROC`."""
    roc = ROC(conf_ind, conf_ood, name=name)
    return [(m if isinstance(m, Metric) else parse_metric(m)).from_roc(roc) for m in metrics]


# --------------------------------------------------------------------------- uncertainty


@dataclass(frozen=True)
class BootstrapResult:
    """Point value and percentile-bootstrap interval ``[low, high]`` at confidence ``level``."""

    value: float
    low: float
    high: float
    level: float
    n_boot: int


@dataclass(frozen=True)
class PairedTestResult:
    """Paired bootstrap comparison of score A against score B on one metric.

    ``delta = metric(A) - metric(B)``; ``[low, high]`` is its percentile interval;
    ``p_value`` is the one-sided bootstrap p-value of "A does not beat B" (delta <= 0).
    """

    delta: float
    low: float
    high: float
    p_value: float


_CHUNK_ELEMENTS = 1 << 22


def _check_boot(n_boot: int, level: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def _resample_chunks(
    rng: np.random.Generator, n_ind: int, n_ood: int, n_boot: int, copies: int = 1
) -> Iterator[tuple[_IArray, _IArray]]:
    """Yield (ind_idx, ood_idx) arrays of shape (chunk, n) drawn with replacement."""
    chunk = max(1, min(n_boot, _CHUNK_ELEMENTS // (copies * (n_ind + n_ood))))
    done = 0
    while done < n_boot:
        c = min(chunk, n_boot - done)
        yield rng.integers(0, n_ind, size=(c, n_ind)), rng.integers(0, n_ood, size=(c, n_ood))
        done += c


def _counts(inverse: _IArray, n_groups: int, idx: _IArray) -> _IArray:
    """Per-row counts of each group among the resampled samples ``idx`` (chunk, n)."""
    rows = idx.shape[0]
    flat = (inverse[idx] + n_groups * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n_groups).reshape(rows, n_groups)


def _interval(stats: _FArray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap(
    metric: Metric,
    conf_ind: Confidences,
    conf_ood: Confidences,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int | None = 0,
    name: str = "confidence",
) -> BootstrapResult:
    """Percentile-bootstrap interval for ``metric``.

    InD and OoD samples are resampled independently with replacement (sizes kept), using
    ``numpy.random.default_rng(seed)``; same seed, same result. Conventions as in the module
    docstring (higher confidence = more InD, OoD positive).
    """
    ind, ood = _validate(conf_ind, conf_ood, name)
    _check_boot(n_boot, level)
    values, inv_ind, inv_ood = _group(ind, ood)
    u = values.size
    value = metric.from_roc(
        ROC._unchecked(
            values, np.bincount(inv_ind, minlength=u), np.bincount(inv_ood, minlength=u), name
        )
    )
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    k = 0
    for ii, oo in _resample_chunks(rng, ind.size, ood.size, n_boot):
        ci, co = _counts(inv_ind, u, ii), _counts(inv_ood, u, oo)
        for r in range(ci.shape[0]):
            stats[k] = metric.from_roc(ROC._unchecked(values, ci[r], co[r], name))
            k += 1
    low, high = _interval(stats, level)
    return BootstrapResult(value=value, low=low, high=high, level=level, n_boot=n_boot)


def paired_bootstrap_test(
    metric: Metric,
    a: tuple[Confidences, Confidences],
    b: tuple[Confidences, Confidences],
    n_boot: int = 1000,
    seed: int | None = 0,
    *,
    level: float = 0.95,
    names: tuple[str, str] = ("A", "B"),
) -> PairedTestResult:
    """Paired bootstrap test of score A = ``(ind_a, ood_a)`` against score B = ``(ind_b, ood_b)``.

    The samples are paired: ``ind_a[i]`` and ``ind_b[i]`` score the same input (same for OoD),
    so both scores are evaluated on the same resampled indices. Returns ``delta = metric(A) -
    metric(B)``, its percentile interval at ``level`` and ``p_value = (1 + #{delta* <= 0}) /
    (n_boot + 1)``: the bootstrap probability that A does not beat B (small = A is better).
    """
    ind_a, ood_a = _validate(a[0], a[1], names[0])
    ind_b, ood_b = _validate(b[0], b[1], names[1])
    if ind_a.size != ind_b.size or ood_a.size != ood_b.size:
        raise ValueError(
            f"paired test needs the same samples scored by {names[0]!r} and {names[1]!r}: got "
            f"{ind_a.size}/{ood_a.size} vs {ind_b.size}/{ood_b.size} InD/OoD values"
        )
    _check_boot(n_boot, level)
    groups = [_group(ind_a, ood_a), _group(ind_b, ood_b)]

    def evaluate(counts: Sequence[tuple[_IArray, _IArray]]) -> float:
        (va, _, _), (vb, _, _) = groups
        (ia, oa), (ib, ob) = counts
        return metric.from_roc(ROC._unchecked(va, ia, oa, names[0])) - metric.from_roc(
            ROC._unchecked(vb, ib, ob, names[1])
        )

    full = [
        (np.bincount(gi, minlength=v.size), np.bincount(go, minlength=v.size))
        for v, gi, go in groups
    ]
    delta = evaluate(full)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    k = 0
    for ii, oo in _resample_chunks(rng, ind_a.size, ood_a.size, n_boot, copies=2):
        per_score = [(_counts(gi, v.size, ii), _counts(go, v.size, oo)) for v, gi, go in groups]
        for r in range(ii.shape[0]):
            stats[k] = evaluate([(ci[r], co[r]) for ci, co in per_score])
            k += 1
    low, high = _interval(stats, level)
    p_value = (1.0 + float(np.count_nonzero(stats <= 0.0))) / (n_boot + 1.0)
    return PairedTestResult(delta=float(delta), low=low, high=high, p_value=p_value)


# --------------------------------------------------------------------------- thresholds
# One threshold rule for every view (dashboard explorer, ROC operating points): a sample is
# rejected (flagged OoD) when ``confidence <= threshold`` and accepted otherwise.


def threshold_for_acceptance(conf_ind: Confidences, acceptance: float) -> float:
    """The largest threshold that still accepts at least ``acceptance`` of the InD samples.

    Samples with ``confidence <= threshold`` are rejected, so the returned ``t`` rejects at most
    ``floor((1 - acceptance) * n)`` InD samples; tied values are rejected together, so with ties
    the attained acceptance can be above the target (never below). ``acceptance=1`` returns a
    value just below the smallest confidence (nothing rejected). NaNs are ignored.
    """
    if not 0.0 <= float(acceptance) <= 1.0:
        raise ValueError(f"acceptance must be in [0, 1], got {acceptance!r}")
    c = _as_float_array(conf_ind).ravel()
    c = np.sort(c[~np.isnan(c)])
    if c.size == 0:
        raise ValueError(
            "threshold_for_acceptance needs at least one InD confidence (got none that is not NaN)."
        )
    allowed = math.floor((1.0 - float(acceptance)) * c.size + 1e-9)
    below = float(np.nextafter(c[0], -np.inf)) if np.isfinite(c[0]) else -np.inf
    if allowed <= 0:
        return below
    uniq = np.unique(c)
    rejected = np.searchsorted(c, uniq, side="right")  # count(conf <= u)
    ok = uniq[rejected <= allowed]
    return float(ok[-1]) if ok.size else below


@dataclass(frozen=True)
class Confusion:
    """Counts at one threshold: InD / OoD samples accepted (conf > t) or rejected (conf <= t)."""

    threshold: float
    ind_accepted: int
    ind_rejected: int
    ood_accepted: int
    ood_rejected: int

    @property
    def ind_acceptance(self) -> float:
        """Fraction of InD samples accepted (1 - FPR)."""
        n = self.ind_accepted + self.ind_rejected
        return self.ind_accepted / n if n else float("nan")

    @property
    def ood_rejection(self) -> float:
        """Fraction of OoD samples rejected (TPR, OoD being the positive class)."""
        n = self.ood_accepted + self.ood_rejected
        return self.ood_rejected / n if n else float("nan")

    @property
    def fpr(self) -> float:
        return 1.0 - self.ind_acceptance

    @property
    def tpr(self) -> float:
        return self.ood_rejection

    def matrix(self) -> Any:
        """2 x 2 counts as a ``pandas.DataFrame``: rows true InD / OoD, columns accepted (as InD)
        / rejected (as OoD)."""
        import pandas as pd

        return pd.DataFrame(
            [[self.ind_accepted, self.ind_rejected], [self.ood_accepted, self.ood_rejected]],
            index=["InD", "OoD"],
            columns=["accepted", "rejected"],
        )


def confusion(conf_ind: Confidences, conf_ood: Confidences, threshold: float) -> Confusion:
    """Accepted / rejected counts of InD and OoD confidences at ``threshold`` (NaN = rejected)."""
    ind, ood = _as_float_array(conf_ind).ravel(), _as_float_array(conf_ood).ravel()
    ind_acc = int(np.sum(ind > threshold))
    ood_acc = int(np.sum(ood > threshold))
    return Confusion(
        float(threshold), ind_acc, int(ind.size - ind_acc), ood_acc, int(ood.size - ood_acc)
    )


def operating_point(
    conf_ind: Confidences, conf_ood: Confidences, threshold: float
) -> tuple[float, float]:
    """``(FPR, TPR)`` of the rule "reject when confidence <= threshold" (a point on the ROC)."""
    c = confusion(conf_ind, conf_ood, threshold)
    return c.fpr, c.tpr


__all__ += ["Confusion", "confusion", "operating_point", "threshold_for_acceptance"]
