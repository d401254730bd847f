"""What the Results page shows, computed from a :class:`~ood_core.runner.RunResult` without
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

from ood_core import metrics, plots
from ood_core.bundle_writer import metrics_wide
from ood_core.config import IND_TITLE
from ood_core.layer_ids import layers_text
from ood_core.operating_points import undetected, wilson_interval
from ood_core.runner import RunResult

ALL_METRICS = "All metrics"
THRESHOLD_MODES = ["Target InD acceptance", "Raw threshold"]
DEFAULT_ACCEPTANCE = 0.95


def _arr(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def series(result: RunResult, i: int) -> dict[str, np.ndarray]:
    """``{dataset: confidences}`` of score ``i`` (InD first), as the histograms draw them."""
    return {IND_TITLE: result.confs_ind[i]} | {
        t: c[i] for t, c in zip(result.ood_titles, result.confs_oods, strict=True)
    }


def index_choice(state: MutableMapping[str, Any], key: str, n: int, default: int = 0) -> int:
    """Keep an index widget's value valid for ``n`` options (reset to ``default`` when not)."""
    value = state.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        state[key] = min(default, n - 1)
    return state[key]


def name_choice(
    state: MutableMapping[str, Any], key: str, names: Sequence[str], default: int = 0
) -> int:
    """An index widget over ``names`` that follows its option **by name**: when the options
    changed since the last view (a re-run), the index moves to the same name if it still
    exists (else ``default``); otherwise the index is kept valid (:func:`index_choice`)."""
    names = list(names)
    memo = f"{key}.names"
    old_names, old_value = state.get(memo, (None, None))
    if old_names is not None and list(old_names) != names:
        idx = state.get(key)
        name = old_names[idx] if isinstance(idx, int) and 0 <= idx < len(old_names) else old_value
        state[key] = names.index(name) if name in names else min(default, len(names) - 1)
    i = index_choice(state, key, len(names), default)
    state[memo] = (tuple(names), names[i] if names else None)
    return i


# ---------------------------------------------------------------------------- thresholds
def explorer_thresholds(result: RunResult, state: MutableMapping[str, Any]) -> dict[int, float]:
    """The threshold explorer's thresholds from its widget state (defaults on first view): one
    per score at the target InD acceptance, or the raw threshold of the chosen score only (kept
    inside that score's finite range)."""
    n = len(result.score_names)
    i = name_choice(state, "w.thr_score", result.score_names)
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
    """One row per OoD set: InD accepted, OoD rejected (TPR) and FPR, in %, and the OoD
    rejected as ``"n of N"`` with its Wilson 95 % interval in % (see
    :mod:`ood_core.operating_points`)."""
    out = []
    for t, c in zip(titles, rows, strict=True):
        n_ood = c.ood_rejected + c.ood_accepted
        lo, hi = wilson_interval(c.ood_rejected, n_ood)
        out.append(
            {
                "OoD scenario": t,
                "InD accepted": 100 * c.ind_acceptance,
                "OoD rejected (TPR)": 100 * c.ood_rejection,
                "FPR": 100 * c.fpr,
                "OoD rejected": f"{c.ood_rejected:,} of {n_ood:,}",
                "95% interval": f"{100 * lo:.1f} to {100 * hi:.1f} %",
            }
        )
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------- metric table
DEFAULT_HEADLINE = "AUC()"
MEAN = "mean"


def headline_metric(result: RunResult) -> str:
    """The headline table's default metric: AUROC (``AUC()``) when the run has it, else the
    first metric."""
    names = [repr(m) for m in result.metrics]
    return DEFAULT_HEADLINE if DEFAULT_HEADLINE in names else names[0]


@dataclass
class Headline:
    """One metric x scenarios: ``values`` (numbers, index score label, a column per OoD set and
    ``mean``), ``text`` (the same cells as shown: ``'0.912 ± 0.021'`` with the half-width of the
    bootstrap interval when there is one), the baseline's label."""

    metric: str
    values: pd.DataFrame
    text: pd.DataFrame
    baseline_label: str | None
    has_intervals: bool


def headline_table(result: RunResult, metric: str | None = None, digits: int = 3) -> Headline:
    """The headline table of ``metric`` (default :func:`headline_metric`): values from the tidy
    ``result.frame``, scores in run order, OoD sets in config order, then their mean."""
    metric = metric or headline_metric(result)
    frame = result.frame[result.frame["metric"] == metric].assign(label=score_labels(result.frame))
    labels = list(dict.fromkeys(frame["label"]))
    titles = list(result.ood_titles)
    values = frame.pivot_table(index="label", columns="ood", values="value", sort=False)
    values = values.reindex(index=labels, columns=titles)
    values[MEAN] = values[titles].mean(axis=1)
    values.index.name = "score"
    values.columns.name = None
    has_ci = "ci_low" in frame and frame["ci_low"].notna().any()
    half = None
    if has_ci:
        frame = frame.assign(half=(frame["ci_high"] - frame["ci_low"]) / 2)
        half = frame.pivot_table(index="label", columns="ood", values="half", sort=False)
        half = half.reindex(index=labels, columns=titles)
    text = values.copy().astype(object)
    for c in values.columns:
        for r in values.index:
            v = values.at[r, c]
            cell = f"{v:.{digits}f}" if np.isfinite(v) else ""
            if half is not None and c in half.columns and np.isfinite(half.at[r, c]):
                cell += f" ± {half.at[r, c]:.{digits}f}"
            text.at[r, c] = cell
    base = result.config.baseline
    base_label = labels[base] if isinstance(base, int) and 0 <= base < len(labels) else None
    return Headline(metric, values, text, base_label, bool(has_ci))


def score_labels(frame: pd.DataFrame) -> pd.Series:
    """Row labels of :func:`ood_core.bundle_writer.metrics_wide`: ``score`` plus ``' @ layers'``."""
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
    wide = metrics_wide(result)
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


def layer_columns(
    pairs: Sequence[tuple[Any, Sequence[Any]]],
) -> tuple[list[str], dict[str, str]]:
    """The heatmap's layer columns in **network order**: ``(order, labels)`` where ``order``
    lists the ``layers`` texts of the results frame sorted by the position of their layers in
    the network's layer table (the score's Recorder), and ``labels`` adds the module names
    (``'1-11 · l3.conv'``). Layers of unbound scores keep their (depth, index) order."""
    keys: dict[str, tuple] = {}
    labels: dict[str, str] = {}
    for score, layers in pairs:
        text = layers_text(layers)
        if not layers or text in keys:
            continue
        rec = getattr(score, "recorder_", None)
        table = {lid: k for k, lid in enumerate(rec.layer_ids)} if rec is not None else {}
        keys[text] = tuple(table.get(tuple(lid), 10**9) for lid in layers) + tuple(layers)
        names = [rec.layer_name(tuple(lid)) if rec is not None else "" for lid in layers]
        shown = ", ".join(n for n in names if n)
        labels[text] = f"{text} · {shown}" if shown else text
    order = sorted(keys, key=lambda t: keys[t])
    return order, labels


def timings_parts(timings: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """The timings as drawn: each score's own time plus one :data:`ood_core.plots.FORWARD_PART`
    row per operation when the frame says which part of each score's seconds is its share of
    the shared forward pass (a ``shared_seconds`` column); else the frame as is (each score's
    seconds then include an equal share of the shared forward pass). ``(frame, split)``."""
    if "shared_seconds" not in timings or timings.empty:
        return timings[["score", "operation", "seconds"]], False
    shared = timings["shared_seconds"].fillna(0.0)
    own = timings.assign(seconds=timings["seconds"] - shared)[["score", "operation", "seconds"]]
    fwd = (
        timings.assign(seconds=shared)
        .groupby("operation", sort=False)["seconds"]
        .sum()
        .reset_index()
        .assign(score=plots.FORWARD_PART)
    )
    return pd.concat([fwd[["score", "operation", "seconds"]], own], ignore_index=True), True


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
    ``i`` = ``i``-th dataset). A box selects exactly the samples of every dataset whose
    (clipped) confidence lies in its x-range (:func:`box_members`): the bars Plotly reports
    with a box (only those whose centre is inside it) are ignored. Without a box, clicked bars
    (``points`` with ``curve_number`` and ``x`` = bin centre, or ``point_numbers`` = sample
    indices) select the samples of that dataset in the bar's bin. Returns ``{dataset: sorted
    unique indices}`` (empty datasets omitted).
    """
    if not selection:
        return {}
    names = list(series)
    arrays = [_arr(series[n]) for n in names]
    found: dict[str, set[int]] = {n: set() for n in names}
    boxes = [r for b in selection.get("box", []) or [] if (r := box_range(b)) is not None]
    if boxes:
        for x0, x1 in boxes:
            for n, idx in zip(names, box_members(arrays, x0, x1, nbins), strict=True):
                found[n].update(idx.tolist())
        return {n: np.array(sorted(v), dtype=np.int64) for n, v in found.items() if v}
    for point in selection.get("points", []) or []:
        curve = point.get("curve_number")
        if curve is None or not 0 <= int(curve) < len(names):
            continue
        curve = int(curve)
        numbers = point.get("point_numbers")
        if numbers:
            found[names[curve]].update(int(i) for i in numbers if 0 <= int(i) < arrays[curve].size)
        elif point.get("x") is not None:
            members = plots.histogram_bin_members(arrays, float(point["x"]), nbins)[curve]
            found[names[curve]].update(members.tolist())
    return {n: np.array(sorted(v), dtype=np.int64) for n, v in found.items() if v}


def box_range(box: Mapping[str, Any]) -> tuple[float, float] | None:
    """``(x0, x1)`` of a Plotly box selection (``box['x']``, in any order); None if it has none."""
    xs = [float(v) for v in box.get("x", []) or [] if v is not None]
    return (min(xs), max(xs)) if len(xs) >= 2 else None


def box_members(arrays: Sequence[Any], x0: float, x1: float, nbins: int = 60) -> list[np.ndarray]:
    """Per array, the indices of the samples whose confidence lies in ``[x0, x1]``, values
    clipped to the histogram's range as drawn (+/-inf at its edges, NaN at its low edge)."""
    lo, hi, _ = plots.histogram_bins(arrays, nbins)
    out = []
    for a in arrays:
        c = np.clip(np.nan_to_num(_arr(a), nan=lo), lo, hi)
        out.append(np.flatnonzero((c >= x0) & (c <= x1)))
    return out


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
    conf: Any,
    idx: Sequence[int],
    labels: Sequence[int] | None = None,
    names: Sequence[str] = (),
    predicted: Sequence[int] | None = None,
) -> list[str]:
    """Captions of a gallery grid: each sample's confidence, under its class when ``labels``
    (index by sample), or under ``'→ predicted class'`` when ``predicted`` (one per ``idx``)."""
    c = _arr(conf)
    caps = []
    for n, k in enumerate(idx):
        cap = f"{c[k]:.3g}"
        if labels is not None:
            cap = f"{class_name(names, int(labels[k]))}<br>{cap}"
        elif predicted is not None:
            cap = f"→ {class_name(names, int(predicted[n]))}<br>{cap}"
        caps.append(cap)
    return caps


def grouped_warnings(messages: Sequence[str]) -> dict[str, list[str]]:
    """A run's warnings grouped by the score they concern, in order: ``{"KNN": ["@ 1-11: k
    = 50 ...", ...]}``. A warning names its score first (``"KNN @ 1-11: ..."`` or ``"KNN:
    ..."``); one that names none is grouped under ``"Run"``. Within a group the score's name is
    dropped from each message (the group says it)."""
    out: dict[str, list[str]] = {}
    for m in dict.fromkeys(messages):
        head, sep, rest = m.partition(": ")
        score = head.split(" @ ", 1)[0].strip() if sep else ""
        if not score or " " in score.split("(", 1)[0]:  # not a score name: a sentence
            out.setdefault("Run", []).append(m)
            continue
        where = head[len(score) :].strip()
        out.setdefault(score, []).append(f"{where}: {rest}" if where else rest)
    return out


def undetected_frame(conf_ood: Any, threshold: float) -> pd.DataFrame:
    """Every OoD sample passing ``threshold`` (confidence above it: accepted as InD, i.e.
    undetected), most confident first: ``sample`` (index in the OoD set), ``confidence``,
    ``threshold``."""
    conf = np.asarray(conf_ood, dtype=np.float64).ravel()
    idx = undetected(conf, threshold, k=len(conf))
    return pd.DataFrame({"sample": idx, "confidence": conf[idx], "threshold": float(threshold)})
