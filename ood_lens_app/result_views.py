"""What the Results page shows, computed from a :class:`~ood_core.pipeline.RunResult` without
drawing: threshold explorer state, the metric table, galleries and histogram selections, the
layer heatmap's rows, image captions.

Conventions (as everywhere in ood-lens): a sample is **rejected** (flagged OoD) when its
confidence ``<= threshold``; the thresholds and confusion counts themselves are
:func:`ood_core.metrics.threshold_for_acceptance` / :func:`ood_core.metrics.confusion`, the
histogram bins :func:`ood_core.plots.histogram_bins`.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ood_core import metrics, pipeline, plots
from ood_core.pipeline import RunResult

ALL_METRICS = "All metrics"
THRESHOLD_MODES = ["Target InD acceptance", "Raw threshold"]
DEFAULT_ACCEPTANCE = 0.95


def _arr(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def series(result: RunResult, i: int) -> dict[str, np.ndarray]:
    """``{dataset: confidences}`` of score ``i`` (InD first), as the histograms draw them."""
    return {pipeline.IND_TITLE: result.confs_ind[i]} | {
        t: c[i] for t, c in zip(result.ood_titles, result.confs_oods, strict=True)
    }


def index_choice(state: MutableMapping[str, Any], key: str, n: int, default: int = 0) -> int:
    """Keep an index widget's value valid for ``n`` options (reset to ``default`` when not)."""
    value = state.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        state[key] = min(default, n - 1)
    return state[key]


# ---------------------------------------------------------------------------- thresholds
def explorer_thresholds(result: RunResult, state: MutableMapping[str, Any]) -> dict[int, float]:
    """The threshold explorer's thresholds from its widget state (defaults on first view): one
    per score at the target InD acceptance, or the raw threshold of the chosen score only (kept
    inside that score's finite range)."""
    n = len(result.score_names)
    i = index_choice(state, "w.thr_score", n)
    state.setdefault("w.thr_mode", THRESHOLD_MODES[0])
    state.setdefault("w.thr_accept", DEFAULT_ACCEPTANCE)
    if state["w.thr_mode"] == THRESHOLD_MODES[0]:
        acc = float(state["w.thr_accept"])
        return {k: metrics.threshold_for_acceptance(result.confs_ind[k], acc) for k in range(n)}
    lo, hi = plots.finite_range(list(series(result, i).values()))
    raw = state.get("w.thr_raw")
    if not isinstance(raw, float) or not lo <= raw <= hi:
        raw = metrics.threshold_for_acceptance(result.confs_ind[i], DEFAULT_ACCEPTANCE)
        state["w.thr_raw"] = float(min(max(raw, lo), hi))
    return {i: float(state["w.thr_raw"])}


def operating_points(
    result: RunResult, j: int, thresholds: Mapping[int, float]
) -> dict[str, tuple[float, float]]:
    """``{score name: (FPR, TPR)}`` on OoD set ``j`` at each score's threshold."""
    return {
        result.score_names[i]: metrics.operating_point(
            result.confs_ind[i], result.confs_oods[j][i], t
        )
        for i, t in thresholds.items()
    }


def confusion_rows(result: RunResult, i: int, threshold: float) -> list[metrics.Confusion]:
    """Score ``i``'s confusion counts against every OoD set at ``threshold``."""
    return [metrics.confusion(result.confs_ind[i], ood[i], threshold) for ood in result.confs_oods]


def confusion_summary(titles: Sequence[str], rows: Sequence[metrics.Confusion]) -> pd.DataFrame:
    """One row per OoD set: InD accepted, OoD rejected (TPR) and FPR, in %."""
    return pd.DataFrame(
        [
            {
                "OoD scenario": t,
                "InD accepted": 100 * c.ind_acceptance,
                "OoD rejected (TPR)": 100 * c.ood_rejection,
                "FPR": 100 * c.fpr,
            }
            for t, c in zip(titles, rows, strict=True)
        ]
    )


# ---------------------------------------------------------------------------- metric table
def score_labels(frame: pd.DataFrame) -> pd.Series:
    """Row labels of :func:`ood_core.pipeline.metrics_wide`: ``score`` plus ``' @ layers'``."""
    return frame["score"] + frame["layers"].map(lambda s: f" @ {s}" if s else "")


def interval_columns(frame: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Bootstrap intervals of the tidy results ``frame`` as text columns
    ``'<ood> | <metric> CI'`` = ``'[low, high]'``, one row per score label (index ``score``);
    empty when the frame has no intervals (``n_boot == 0``)."""
    if "ci_low" not in frame or frame["ci_low"].isna().all():
        return pd.DataFrame()
    sub = frame.assign(
        label=score_labels(frame),
        col=frame["ood"] + " | " + frame["metric"] + " CI",
        text=[
            f"[{lo:.{digits}f}, {hi:.{digits}f}]" if np.isfinite(lo) else ""
            for lo, hi in zip(frame["ci_low"], frame["ci_high"], strict=True)
        ],
    )
    out = sub.pivot_table(index="label", columns="col", values="text", aggfunc="first", sort=False)
    out.columns.name = None
    out.index.name = "score"
    return out


@dataclass
class MetricTable:
    """The metric table as shown: ``frame`` indexed by score label, ``value_columns`` (numbers,
    highlighted per column), the baseline's label, whether intervals are included."""

    frame: pd.DataFrame
    value_columns: list[str]
    baseline_label: str | None
    has_intervals: bool


def metric_table(result: RunResult, choice: str = ALL_METRICS) -> MetricTable:
    """All ``'<ood> | <metric>'`` columns, or (``choice`` = one metric) one column per OoD set
    plus their mean; each followed by its bootstrap interval column when there are intervals."""
    wide = pipeline.metrics_wide(result)
    cols = [c for c in wide.columns if c != "score"]
    if choice != ALL_METRICS:
        cols = [c for c in cols if c.split(" | ", 1)[1] == choice]
        wide = wide[["score", *cols]].rename(columns={c: c.split(" | ", 1)[0] for c in cols})
        cols = [c.split(" | ", 1)[0] for c in cols]
        wide["mean"] = wide[cols].mean(axis=1)
        cols.append("mean")
    base = result.config.baseline
    labels = list(score_labels(result.frame).drop_duplicates())
    base_label = labels[base] if isinstance(base, int) and 0 <= base < len(labels) else None
    ci = interval_columns(result.frame)
    if not ci.empty:
        if choice != ALL_METRICS:
            ci = ci[[c for c in ci.columns if c.split(" | ", 1)[1] == f"{choice} CI"]]
            ci.columns = [c.split(" | ", 1)[0] + " CI" for c in ci.columns]
        wide = wide.join(ci, on="score")
        order = ["score"]
        for c in cols:
            order += [c] + ([f"{c} CI"] if f"{c} CI" in wide.columns else [])
        wide = wide[order]
    return MetricTable(wide.set_index("score"), cols, base_label, not ci.empty)


def heatmap_frame(frame: pd.DataFrame, metric: str, ood: str | None = None) -> pd.DataFrame:
    """Rows of the tidy results ``frame`` for one ``metric`` (and one OoD set, or all of them,
    the heatmap then averaging over OoD sets), restricted to scores that ran on at least two
    different layer sets; empty when there are none."""
    sub = frame[frame["metric"] == metric]
    if ood is not None:
        sub = sub[sub["ood"] == ood]
    n_layers = sub.groupby("score")["layers"].nunique()
    keep = n_layers[n_layers >= 2].index
    return sub[sub["score"].isin(keep)].reset_index(drop=True)


# ---------------------------------------------------------------------------- galleries
def extreme_indices(conf: Any, k: int, most: bool = True) -> np.ndarray:
    """Indices of the ``k`` most (``most=True``) or least confident samples, most extreme first.

    Stable on ties (lower index first); NaNs are never returned.
    """
    c = _arr(conf)
    valid = np.flatnonzero(~np.isnan(c))
    order = np.argsort(-c[valid] if most else c[valid], kind="stable")
    return valid[order[: max(0, int(k))]]


def selection_to_indices(
    selection: Mapping[str, Any] | None, series: Mapping[str, Any], nbins: int = 60
) -> dict[str, np.ndarray]:
    """Map a Streamlit/Plotly histogram selection back to sample indices per dataset.

    ``series`` is the ``{dataset: confidences}`` mapping the histogram was drawn from (trace
    ``i`` = ``i``-th dataset). Selected bars (``points`` with ``curve_number`` and ``x`` = bin
    centre, or ``point_numbers`` = sample indices) select the samples of that dataset falling in
    the bar's bin; Plotly reports the bars inside a box selection as points too. Only when no
    bar is reported does a box select the samples of every dataset whose (clipped) confidence
    lies in its x-range. Returns ``{dataset: sorted unique indices}`` (empty datasets omitted).
    """
    if not selection:
        return {}
    names = list(series)
    arrays = [_arr(series[n]) for n in names]
    found: dict[str, set[int]] = {n: set() for n in names}
    n_points = 0
    for point in selection.get("points", []) or []:
        curve = point.get("curve_number")
        if curve is None or not 0 <= int(curve) < len(names):
            continue
        curve = int(curve)
        numbers = point.get("point_numbers")
        if numbers:
            found[names[curve]].update(int(i) for i in numbers if 0 <= int(i) < arrays[curve].size)
            n_points += 1
        elif point.get("x") is not None:
            n_points += 1
            members = plots.histogram_bin_members(arrays, float(point["x"]), nbins)[curve]
            found[names[curve]].update(members.tolist())
    if n_points == 0:
        lo, hi, _ = plots.histogram_bins(arrays, nbins)
        clipped = [np.clip(np.nan_to_num(a, nan=lo), lo, hi) for a in arrays]
        for box in selection.get("box", []) or []:
            xs = [float(v) for v in box.get("x", []) if v is not None]
            if len(xs) < 2:
                continue
            x0, x1 = min(xs), max(xs)
            for n, c in zip(names, clipped, strict=True):
                found[n].update(np.flatnonzero((c >= x0) & (c <= x1)).tolist())
    return {n: np.array(sorted(v), dtype=np.int64) for n, v in found.items() if v}


def class_name(names: Sequence[str], label: int) -> str:
    """The class name of ``label`` (the number itself when the data names fewer classes)."""
    return names[label] if 0 <= label < len(names) else str(label)


def prediction_captions(
    labels: Sequence[int], predictions: Sequence[int], names: Sequence[str]
) -> list[str]:
    """Captions of a preview grid: the true class, ``→ predicted`` when wrong."""
    out = []
    for true, guess in zip(labels, predictions, strict=True):
        text = class_name(names, int(true))
        if int(guess) != int(true):
            text += f" → {class_name(names, int(guess))}"
        out.append(text)
    return out


def confidence_captions(
    conf: Any, idx: Sequence[int], labels: Sequence[int] | None = None, names: Sequence[str] = ()
) -> list[str]:
    """Captions of a gallery grid: each sample's confidence, under its class when ``labels``."""
    c = _arr(conf)
    caps = []
    for k in idx:
        cap = f"{c[k]:.3g}"
        if labels is not None:
            cap = f"{class_name(names, int(labels[k]))}<br>{cap}"
        caps.append(cap)
    return caps
