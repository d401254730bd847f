"""The layer and parameter study of a run: which layer or value is best, and by how much.

A **sweep** is two or more scores of one class in a run: over layers (a layer sweep: one score
per layer, the same parameters) or over a parameter (the same layers, one parameter's values).
:func:`study_frame` lays each swept class out along its axis (layers in network order, numeric
values in increasing order), :func:`ranking` names the best point of each, its margin over the
next best and over the run's baseline score, and :func:`study_figure` draws the metric against
the axis, one line per class, the best marked (bootstrap intervals as error bars when the run
has them and one OoD set is chosen). No Streamlit here.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ood_core import plots
from ood_core.scores import get_score_class
from ood_lens_app.compare import layer_order, score_class

MEAN = "mean over OoD sets"
"""The ``ood`` choice that averages the metric over every OoD set (no interval then)."""
COLUMNS = ["score", "axis", "x", "value", "ci_low", "ci_high", "label", "layers"]
"""Columns of :func:`study_frame`: the swept class, what varies (``"layer"`` or the
parameter's name), the point's position text, the metric value and interval (NaN if none),
the score's label and layers in the run."""


def _params(label: str) -> dict[str, str]:
    """``"KNN(k=15, act_norm=False)"`` -> ``{"k": "15", "act_norm": "False"}`` (texts)."""
    inner = label[label.find("(") + 1 : label.rfind(")")] if "(" in label else ""
    out: dict[str, str] = {}
    for piece in (p for p in inner.split(", ") if "=" in p):
        k, v = piece.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _default_text(cls: str, param: str) -> str:
    """The default of ``cls``'s ``param`` as its label writes values (a label omits defaults)."""
    try:
        descs = get_score_class(cls).describe_params()
    except (KeyError, ValueError):
        return "default"
    value = next((d.get("default") for d in descs if d["name"] == param), "default")
    return repr(value)


def _number(text: str) -> float:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return math.nan
    return (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    )


def _values(frame: pd.DataFrame, metric: str, ood: str) -> pd.DataFrame:
    """One row per (score, layers): the metric on ``ood`` (or its mean, :data:`MEAN`)."""
    rows = frame[frame["metric"] == metric].copy()
    rows["layers"] = ["" if v != v or v is None else str(v) for v in rows["layers"]]
    keys = ["score", "layers"]
    if ood != MEAN:
        rows = rows[rows["ood"] == ood]
        cols = [c for c in ("ci_low", "ci_high") if c in rows.columns]
        return rows[[*keys, "value", *cols]].reset_index(drop=True)
    return rows.groupby(keys, sort=False, as_index=False)["value"].mean()


def study_frame(frame: pd.DataFrame, metric: str, ood: str = MEAN) -> pd.DataFrame:
    """:data:`COLUMNS` for every swept class of a run's metric frame (``RunResult.frame`` or a
    bundle's metrics), in the run's order of classes and each along its axis."""
    values = _values(frame, metric, ood)
    out = []
    for cls in dict.fromkeys(score_class(s) for s in values["score"]):
        rows = values[[score_class(s) == cls for s in values["score"]]]
        if len(rows) < 2:  # noqa: PLR2004 (one point is no sweep)
            continue
        params = [_params(s) for s in rows["score"]]
        keys = sorted({k for p in params for k in p})
        varying = [k for k in keys if len({p.get(k) for p in params}) > 1]
        layers_vary = rows["layers"].nunique() > 1
        if layers_vary and not varying:
            axis, xs = "layer", list(rows["layers"])
            order = [layer_order(x) for x in xs]
        elif len(varying) == 1 and not layers_vary:
            axis = varying[0]
            default = _default_text(cls, axis)
            xs = [p.get(axis, default) for p in params]
            nums = [_number(x) for x in xs]
            order = nums if not any(math.isnan(v) for v in nums) else list(range(len(xs)))
        else:  # several things vary at once: the run's order, each point named in full
            axis = "setting"
            xs = [
                f"{s} @ {ly}" if ly else s
                for s, ly in zip(rows["score"], rows["layers"], strict=True)
            ]
            order = list(range(len(xs)))
        part = pd.DataFrame(
            {
                "score": cls,
                "axis": axis,
                "x": xs,
                "value": rows["value"].to_numpy(np.float64),
                "ci_low": rows["ci_low"].to_numpy(np.float64) if "ci_low" in rows else math.nan,
                "ci_high": rows["ci_high"].to_numpy(np.float64) if "ci_high" in rows else math.nan,
                "label": list(rows["score"]),
                "layers": list(rows["layers"]),
            }
        )
        out.append(part.iloc[sorted(range(len(part)), key=order.__getitem__)])
    if not out:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(out, ignore_index=True)[COLUMNS]


@dataclass(frozen=True)
class Best:
    """The best point of one swept class."""

    score: str
    axis: str
    x: str
    value: float
    margin_next: float
    """Best minus the second best point of the same sweep."""
    margin_baseline: float
    """Best minus the run's baseline score (NaN without one, or when it is in this sweep)."""


def ranking(
    study: pd.DataFrame, baseline: float | None = None, baseline_label: str | None = None
) -> pd.DataFrame:
    """One row per swept class, best first: ``score``, ``varies``, ``best``, the value, the
    margin over the next best point and over the baseline's value (``baseline``; NaN for the
    sweep the baseline score itself belongs to, ``baseline_label`` as ``"Gram() @ 1-5"``)."""
    rows = []
    for cls, part in study.groupby("score", sort=False):
        ordered = part.sort_values("value", ascending=False, kind="stable")
        top, second = ordered.iloc[0], ordered.iloc[1]
        labels = {
            f"{s} @ {ly}" if ly else s for s, ly in zip(part["label"], part["layers"], strict=True)
        }
        own = baseline_label is not None and baseline_label in labels
        base = math.nan if baseline is None or own else float(top["value"]) - baseline
        rows.append(
            Best(
                str(cls),
                str(top["axis"]),
                str(top["x"]),
                float(top["value"]),
                float(top["value"]) - float(second["value"]),
                base,
            )
        )
    rows.sort(key=lambda b: -b.value)
    return pd.DataFrame(
        [
            {
                "score": b.score,
                "varies": b.axis,
                "best": b.x,
                "value": b.value,
                "margin over the next": b.margin_next,
                "margin over the baseline": b.margin_baseline,
            }
            for b in rows
        ]
    )


def ranking_text(best: pd.DataFrame) -> pd.DataFrame:
    """:func:`ranking` as shown: the value to 3 decimals, margins signed (``+0.045``), "-" where
    there is none (no baseline, or the baseline's own sweep)."""

    def signed(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:+.3f}"

    out = best.copy()
    out["value"] = [f"{v:.3f}" for v in best["value"]]
    for col in ("margin over the next", "margin over the baseline"):
        out[col] = [signed(float(v)) for v in best[col]]
    return out


def _point(axis: str, x: str) -> str:
    """A point's text on the shared x axis: a layer id, ``k=15``, or a full setting."""
    return x if axis in ("layer", "setting") else f"{axis}={x}"


def _categories(study: pd.DataFrame) -> list[str]:
    """The shared x axis: every layer in network order, then each parameter's values in their
    sweep's order (a category axis would otherwise order points by first appearance)."""
    layers = sorted(set(study.loc[study["axis"] == "layer", "x"]), key=layer_order)
    rest = [_point(a, x) for a, x in zip(study["axis"], study["x"], strict=True) if a != "layer"]
    return [*layers, *dict.fromkeys(rest)]


def study_figure(study: pd.DataFrame, metric_title: str) -> go.Figure:
    """The metric against each sweep's axis, one line per class (its points in axis order),
    the best point of each marked with a star; error bars where intervals are known."""
    colors = plots.score_colors(list(dict.fromkeys(study["score"])))
    fig = go.Figure()
    for cls, part in study.groupby("score", sort=False):
        has_ci = part["ci_low"].notna().all() and part["ci_high"].notna().all()
        error = (
            {
                "type": "data",
                "symmetric": False,
                "array": part["ci_high"] - part["value"],
                "arrayminus": part["value"] - part["ci_low"],
            }
            if has_ci
            else None
        )
        axis = part["axis"].iloc[0]
        name = f"{cls} (over {axis})" if axis != "setting" else str(cls)
        fig.add_trace(
            go.Scatter(
                x=[_point(axis, x) for x in part["x"]],
                y=part["value"],
                mode="lines+markers",
                name=name,
                line={"color": colors[cls]},
                error_y=error,
                hovertemplate="%{x}: %{y:.4f}<extra>" + str(cls) + "</extra>",
            )
        )
        best = part.loc[part["value"].idxmax()]
        fig.add_trace(
            go.Scatter(
                x=[_point(axis, best["x"])],
                y=[best["value"]],
                mode="markers+text",
                marker={"symbol": "star", "size": 16, "color": colors[cls]},
                text=["best"],
                textposition="top center",
                showlegend=False,
                hovertemplate="best: %{x}: %{y:.4f}<extra>" + str(cls) + "</extra>",
            )
        )
    fig.update_xaxes(categoryorder="array", categoryarray=_categories(study))
    fig.update_layout(
        title=f"{metric_title} along each sweep (star: the best)",
        yaxis_title=metric_title,
        xaxis_title="layer (network order) or parameter value",
        height=460,
        legend={"orientation": "h", "y": -0.25},
    )
    return plots.plain_axes(fig)


__all__ = ["MEAN", "COLUMNS", "Best", "ranking", "study_figure", "study_frame"]
