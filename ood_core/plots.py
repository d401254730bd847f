"""Plotly figures: score histograms, ROC curves, summary grid, heatmaps, timings, image grids.

Every function returns a ``plotly.graph_objects.Figure`` and takes plain arrays / DataFrames, so
the dashboard, the HTML report and notebooks share them. Confidence: higher = more InD; ROC
curves plot TPR (OoD flagged) against FPR (InD flagged), OoD being the positive class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ood_core.metrics import ROC

PALETTE = px.colors.qualitative.Plotly
# InD in green, OoD sets in colours far from it (Set1 without its green)
SCENARIO_PALETTE = [
    "#2E7D32",
    "#E41A1C",
    "#377EB8",
    "#984EA3",
    "#FF7F00",
    "#A65628",
    "#F781BF",
    "#999999",
    "#D4B000",
]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def finite_range(arrays: Sequence[Any]) -> tuple[float, float]:
    """``(min, max)`` over the finite values of several arrays (a unit range if none / constant)."""
    arrays = [_np(a) for a in arrays]
    vals = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.zeros(1)
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = float(vals.min()), float(vals.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def roc_curve_points(
    conf_ind: Any, conf_ood: Any, kind: str = "pessimistic"
) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of the ROC: the Pareto front (draw with ``line_shape='hv'`` for the
    pessimistic staircase) or the convex hull vertices (``kind='convex_hull'``)."""
    roc = ROC(_np(conf_ind), _np(conf_ood))
    if kind == "convex_hull":
        return roc.hull_fpr, roc.hull_tpr
    return roc.fpr, roc.tpr


def add_histograms(
    fig: go.Figure,
    series: Mapping[str, Any],
    row: int | None = None,
    col: int | None = None,
    nbins: int = 60,
    showlegend: bool = True,
) -> None:
    """Overlaid density histograms (one per dataset, shared bins; +/-inf values are clipped to the
    finite range and counted at its edges)."""
    arrays = {k: _np(v) for k, v in series.items()}
    lo, hi = finite_range(list(arrays.values()))
    size = (hi - lo) / nbins
    for i, (name, a) in enumerate(arrays.items()):
        fig.add_trace(
            go.Histogram(
                x=np.clip(a, lo, hi),
                name=name,
                legendgroup=name,
                showlegend=showlegend,
                histnorm="probability density",
                opacity=0.55,
                xbins={"start": lo, "end": hi + size, "size": size},
                marker_color=SCENARIO_PALETTE[i % len(SCENARIO_PALETTE)],
                hovertemplate=f"{name}<br>confidence %{{x:.4g}}<br>density %{{y:.3g}}<extra></extra>",
            ),
            row=row,
            col=col,
        )
    fig.update_layout(barmode="overlay")


def histogram_figure(series: Mapping[str, Any], title: str = "", nbins: int = 60) -> go.Figure:
    """Density histograms of confidences, one trace per dataset (InD first)."""
    fig = go.Figure()
    add_histograms(fig, series, nbins=nbins)
    fig.update_layout(
        title=title,
        xaxis_title="confidence (higher = more in-distribution)",
        yaxis_title="density",
        legend_title="dataset",
    )
    return fig


def add_rocs(
    fig: go.Figure,
    curves: Mapping[str, tuple[Any, Any]],
    row: int | None = None,
    col: int | None = None,
    convex_hull: bool = False,
    showlegend: bool = True,
) -> None:
    """ROC curves ``{score name: (conf_ind, conf_ood)}`` with the diagonal of chance."""
    fig.add_trace(
        go.Scatter(
            x=[0, 1],
            y=[0, 1],
            mode="lines",
            line={"dash": "dot", "color": "grey"},
            showlegend=False,
            hoverinfo="skip",
        ),
        row=row,
        col=col,
    )
    for i, (name, (ind, ood)) in enumerate(curves.items()):
        color = PALETTE[i % len(PALETTE)]
        fpr, tpr = roc_curve_points(ind, ood)
        fig.add_trace(
            go.Scatter(
                x=fpr,
                y=tpr,
                mode="lines",
                line_shape="hv",
                name=name,
                legendgroup=name,
                showlegend=showlegend,
                line={"color": color},
                hovertemplate=f"{name}<br>FPR %{{x:.3f}}<br>TPR %{{y:.3f}}<extra></extra>",
            ),
            row=row,
            col=col,
        )
        if convex_hull:
            hf, ht = roc_curve_points(ind, ood, "convex_hull")
            fig.add_trace(
                go.Scatter(
                    x=hf,
                    y=ht,
                    mode="lines",
                    line={"color": color, "dash": "dash"},
                    name=f"{name} (hull)",
                    legendgroup=name,
                    showlegend=False,
                ),
                row=row,
                col=col,
            )


def roc_figure(
    curves: Mapping[str, tuple[Any, Any]],
    title: str = "",
    convex_hull: bool = False,
    operating_points: Mapping[str, tuple[float, float]] | None = None,
) -> go.Figure:
    """ROC curves of several scores on one OoD set; optional marked operating points
    ``{score: (fpr, tpr)}``."""
    fig = go.Figure()
    add_rocs(fig, curves, convex_hull=convex_hull)
    for i, (name, (fpr, tpr)) in enumerate((operating_points or {}).items()):
        fig.add_trace(
            go.Scatter(
                x=[fpr],
                y=[tpr],
                mode="markers",
                name=f"{name} @ threshold",
                marker={"size": 12, "symbol": "x", "color": PALETTE[i % len(PALETTE)]},
            )
        )
    fig.update_layout(
        title=title,
        xaxis_title="FPR (InD flagged as OoD)",
        yaxis_title="TPR (OoD flagged)",
        legend_title="score",
    )
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(range=[0, 1.02])
    return fig


def summary_plot(
    confs_ind: Any,
    confs_oods: Sequence[Any],
    *,
    scores_and_layers: Sequence[tuple[Any, Sequence[Any]]],
    oods_title: Sequence[str] | None = None,
    convex_hull: bool = False,
) -> go.Figure:
    """Seed-style grid. Row 1: one histogram per score, scenarios coloured. Row 2: one ROC per OoD
    set, scores coloured. ``confs_ind`` ``(n_scores, n_ind)``, ``confs_oods[i]`` ``(n_scores, n)``."""
    from ood_core.report import score_label

    ind = _np(confs_ind)
    oods = [_np(c) for c in confs_oods]
    titles = (
        list(oods_title) if oods_title is not None else [f"OoD {i + 1}" for i in range(len(oods))]
    )
    names = [score_label(s, layers, multiline=False) for s, layers in scores_and_layers]
    n_cols = max(len(names), len(oods), 1)
    subplot_titles = [*names, *[""] * (n_cols - len(names)), *titles, *[""] * (n_cols - len(oods))]
    fig = make_subplots(rows=2, cols=n_cols, subplot_titles=subplot_titles, vertical_spacing=0.14)
    for i in range(len(names)):
        series = {"InD": ind[i], **{t: o[i] for t, o in zip(titles, oods, strict=True)}}
        add_histograms(fig, series, row=1, col=i + 1, showlegend=(i == 0))
    for j, ood in enumerate(oods):
        curves = {n: (ind[i], ood[i]) for i, n in enumerate(names)}
        add_rocs(fig, curves, row=2, col=j + 1, convex_hull=convex_hull, showlegend=(j == 0))
        fig.update_xaxes(title_text="FPR", range=[0, 1], row=2, col=j + 1)
        fig.update_yaxes(title_text="TPR" if j == 0 else None, range=[0, 1.02], row=2, col=j + 1)
    fig.update_layout(
        height=700,
        barmode="overlay",
        title="Confidence distributions (top) and ROC curves, OoD = positive (bottom)",
    )
    return fig


def heatmap_figure(
    frame: pd.DataFrame, value: str = "value", x: str = "layers", y: str = "score", title: str = ""
) -> go.Figure:
    """Heatmap of ``value`` over ``y`` x ``x`` (e.g. score x layer) with annotated cells."""
    pivot = frame.pivot_table(index=y, columns=x, values=value, aggfunc="mean")
    fig = px.imshow(
        pivot,
        text_auto=".3f",
        color_continuous_scale="Viridis",
        zmin=0,
        zmax=1,
        aspect="auto",
        title=title,
    )
    return fig


def timings_figure(frame: pd.DataFrame, title: str = "Time per score") -> go.Figure:
    """Horizontal bars of seconds per score and operation (columns score, operation, seconds)."""
    fig = px.bar(frame, x="seconds", y="score", color="operation", orientation="h", title=title)
    fig.update_layout(yaxis_title="", xaxis_title="seconds")
    return fig


def image_grid_figure(
    images: Any, captions: Sequence[str], n_cols: int = 8, title: str = ""
) -> go.Figure:
    """A grid of images ``(N, C, H, W)`` in [0, 1] with captions (grey or RGB)."""
    imgs = _np(images)
    n = len(imgs)
    n_cols = max(1, min(n_cols, n))
    n_rows = max(1, -(-n // n_cols))
    fig = make_subplots(
        rows=n_rows,
        cols=n_cols,
        subplot_titles=list(captions)[:n],
        horizontal_spacing=0.01,
        vertical_spacing=0.08,
    )
    for k in range(n):
        img = imgs[k]
        rgb = np.repeat(img, 3, axis=0) if img.shape[0] == 1 else img[:3]
        fig.add_trace(
            go.Image(
                z=(rgb.transpose(1, 2, 0) * 255).clip(0, 255).astype(np.uint8), hoverinfo="skip"
            ),
            row=k // n_cols + 1,
            col=k % n_cols + 1,
        )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_annotations(font_size=10)
    fig.update_layout(
        title=title, height=max(200, 130 * n_rows + 60), margin={"l": 10, "r": 10, "t": 60, "b": 10}
    )
    return fig


def histogram_bins(arrays: Sequence[Any], nbins: int = 60) -> tuple[float, float, float]:
    """``(lo, hi, size)`` of the shared bins :func:`add_histograms` draws: the finite range of
    all arrays (:func:`finite_range`; +/-inf values are clipped to its edges) cut in ``nbins``."""
    lo, hi = finite_range(arrays)
    return lo, hi, (hi - lo) / nbins


def histogram_bin_members(arrays: Sequence[Any], x: float, nbins: int = 60) -> list[np.ndarray]:
    """Per array, the indices of the values in the histogram bar containing ``x`` (bins of
    :func:`histogram_bins`; values clipped to the range, NaN counted at its low edge; the last
    bar includes the maximum)."""
    lo, hi, size = histogram_bins(arrays, nbins)
    k = min(nbins - 1, max(0, int(np.floor((float(x) - lo) / size)))) if size > 0 else 0
    left = lo + k * size
    out = []
    for a in arrays:
        c = np.clip(np.nan_to_num(_np(a).ravel(), nan=lo), lo, hi)
        hit = (c >= left) & (c < left + size) if k < nbins - 1 else (c >= left)
        out.append(np.flatnonzero(hit))
    return out
