"""Plotly figures: score histograms, ROC curves, summary grid, heatmaps, timings, image grids.

Every function returns a ``plotly.graph_objects.Figure`` and takes plain arrays / DataFrames, so
the dashboard, the HTML report and notebooks share them. Confidence: higher = more InD; ROC
curves plot TPR (OoD flagged) against FPR (InD flagged), OoD being the positive class.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ood_core.metrics import ROC

# Scenarios: InD always green; each OoD set by its identity (its title without parameters), in
# colours far from InD's green (Set1 without its green, then seven darker ones); a built-in
# scenario always has the same colour (KNOWN_SCENARIOS), whatever else a run scores. Scores: a
# separate palette (Dark2 then Set2-like greys/browns), by position in the run.
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
    "#283593",
    "#00838F",
    "#C2185B",
    "#37474F",
    "#6A1B9A",
    "#9E9D24",
    "#01579B",
]
KNOWN_SCENARIOS = (
    "Vertical flip",
    "Darker",
    "Uniformly random",
    "MNIST digits",
    "Gaussian noise",
    "Horizontal flip",
    "Brighter",
    "Gaussian blur",
    "Rotation",
    "Pixel shuffle",
    "Contrast",
    "Patch shuffle",
    "Quantize",
    "Invert",
    "Fashion-MNIST",
)
"""Built-in scenario titles, each with its own OoD colour (``SCENARIO_PALETTE[1 + position]``);
a test checks every registered perturbation and bundled dataset is listed."""
SCORE_PALETTE = [
    "#1B9E77",
    "#D95F02",
    "#7570B3",
    "#E7298A",
    "#66A61E",
    "#E6AB02",
    "#A6761D",
    "#666666",
    "#17BECF",
    "#8C564B",
]
PALETTE = SCORE_PALETTE  # the former name (scores)
IND_NAME = "InD"
_N_OOD = len(SCENARIO_PALETTE) - 1


def scenario_color(index: int) -> str:
    """Colour of dataset ``index``: 0 = InD (always the same green), ``j + 1`` = OoD colour
    ``j`` (cycling over the OoD colours)."""
    if index <= 0:
        return SCENARIO_PALETTE[0]
    return SCENARIO_PALETTE[1 + (index - 1) % _N_OOD]


def scenario_identity(title: str) -> str:
    """A scenario's identity: its title without parameters (``"Darker (factor=0.3)"`` ->
    ``"Darker"``)."""
    return title.split(" (", 1)[0].strip()


def _preferred(title: str) -> int:
    """The OoD colour a scenario asks for: its place in :data:`KNOWN_SCENARIOS`, else a stable
    hash of its identity (the same in every run and process)."""
    ident = scenario_identity(title)
    if ident in KNOWN_SCENARIOS:
        return KNOWN_SCENARIOS.index(ident) % _N_OOD
    return int(hashlib.sha1(ident.encode()).hexdigest(), 16) % _N_OOD  # noqa: S324 (a colour)


def scenario_colors(titles: Sequence[str]) -> dict[str, str]:
    """``{dataset title: colour}`` of a run's datasets: ``'InD'`` green, each OoD set the colour
    its identity asks for (:func:`_preferred`: MNIST digits keeps its colour in any set of
    scenarios), the next free one when another set of this run holds it; InD may be omitted."""
    out = {IND_NAME: scenario_color(0)}
    taken: set[int] = set()
    for t in (t for t in dict.fromkeys(titles) if t != IND_NAME):
        j = _preferred(t)
        for step in range(_N_OOD):
            if (j + step) % _N_OOD not in taken:
                j = (j + step) % _N_OOD
                break
        taken.add(j)
        out[t] = scenario_color(j + 1)
    return out


EXTRA_SCORE_COLORS = [
    c
    for c in px.colors.qualitative.Dark24 + px.colors.qualitative.Light24
    if c.upper() not in {x.upper() for x in SCORE_PALETTE + SCENARIO_PALETTE}
]
"""Colours of the scores past :data:`SCORE_PALETTE`'s ten (a sweep has many): all distinct."""


def score_colors(labels: Sequence[str]) -> dict[str, str]:
    """``{score label: colour}`` by position in the run (same config, same colours); distinct
    for the first ``len(SCORE_PALETTE) + len(EXTRA_SCORE_COLORS)`` scores."""
    palette = SCORE_PALETTE + EXTRA_SCORE_COLORS
    return {name: palette[i % len(palette)] for i, name in enumerate(labels)}


def height_for_legend(n_entries: int, plot_px: int = 300, per_row: int = 2) -> int:
    """Figure height (px) that keeps ``plot_px`` of plot above a legend of ``n_entries`` laid
    out below it, ``per_row`` entries a row: a long legend grows the figure, never shrinks
    the plot."""
    rows = -(-max(1, n_entries) // max(1, per_row))
    return plot_px + 90 + 22 * rows


def score_color(colors: Mapping[str, str], name: str) -> str | None:
    """The colour of ``name`` in ``colors`` (:func:`score_colors`): an exact label, else the first
    label ``'<name> @ layers'`` (timings name scores without their layers); None if unknown."""
    if name in colors:
        return colors[name]
    return next((c for label, c in colors.items() if label.split(" @ ", 1)[0] == name), None)


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def plain_axes(fig: go.Figure) -> go.Figure:
    """Axis numbers written out (``0.0006``, ``20,000,000``), never with SI prefixes (Plotly's
    default writes ``600µ`` and ``20T``, unreadable on a density or a confidence axis)."""
    fig.update_xaxes(exponentformat="none", separatethousands=True)
    fig.update_yaxes(exponentformat="none", separatethousands=True)
    return fig


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
    colors: Mapping[str, str] | None = None,
    legend: str = "legend",
) -> None:
    """Overlaid density histograms (one per dataset, shared bins; +/-inf values are clipped to the
    finite range and counted at its edges), coloured by ``colors`` (default
    :func:`scenario_colors` of the series' names: InD green, OoD sets by position)."""
    arrays = {k: _np(v) for k, v in series.items()}
    colors = colors or scenario_colors(list(arrays))
    lo, hi = finite_range(list(arrays.values()))
    size = (hi - lo) / nbins
    for name, a in arrays.items():
        fig.add_trace(
            go.Histogram(
                x=np.clip(a, lo, hi),
                name=name,
                legendgroup=name,
                showlegend=showlegend,
                histnorm="probability density",
                opacity=0.55,
                xbins={"start": lo, "end": hi + size, "size": size},
                marker_color=colors.get(name, SCENARIO_PALETTE[-1]),
                legend=legend,
                hovertemplate=f"{name}<br>confidence %{{x:.4g}}<br>density %{{y:.3g}}<extra></extra>",
            ),
            row=row,
            col=col,
        )
    fig.update_layout(barmode="overlay")


def histogram_figure(
    series: Mapping[str, Any],
    title: str = "",
    nbins: int = 60,
    colors: Mapping[str, str] | None = None,
) -> go.Figure:
    """Density histograms of confidences, one trace per dataset (InD first; ``colors`` as in
    :func:`add_histograms`)."""
    fig = go.Figure()
    add_histograms(fig, series, nbins=nbins, colors=colors)
    fig.update_layout(
        title=title,
        xaxis_title="confidence (higher = more in-distribution)",
        yaxis_title="density",
        legend_title="dataset",
    )
    return plain_axes(fig)


def add_rocs(
    fig: go.Figure,
    curves: Mapping[str, tuple[Any, Any]],
    row: int | None = None,
    col: int | None = None,
    convex_hull: bool = False,
    showlegend: bool = True,
    colors: Mapping[str, str] | None = None,
    legend: str = "legend",
    dashes: Mapping[str, str] | None = None,
) -> None:
    """ROC curves ``{score name: (conf_ind, conf_ood)}`` with the diagonal of chance, coloured by
    ``colors`` (default :func:`score_colors` of the names), line dash by ``dashes`` (Plotly dash
    names per curve; default solid)."""
    colors = colors or score_colors(list(curves))
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
    for name, (ind, ood) in curves.items():
        color = score_color(colors, name) or SCORE_PALETTE[-1]
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
                legend=legend,
                line={"color": color, "dash": (dashes or {}).get(name, "solid")},
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
    colors: Mapping[str, str] | None = None,
    dashes: Mapping[str, str] | None = None,
) -> go.Figure:
    """ROC curves of several scores on one OoD set; optional marked operating points
    ``{score: (fpr, tpr)}``, each in its score's colour (``colors``, default
    :func:`score_colors` of the curves' names); ``dashes``: line dash per curve."""
    fig = go.Figure()
    colors = colors or score_colors(list(curves))
    add_rocs(fig, curves, convex_hull=convex_hull, colors=colors, dashes=dashes)
    for name, (fpr, tpr) in (operating_points or {}).items():
        fig.add_trace(
            go.Scatter(
                x=[fpr],
                y=[tpr],
                mode="markers",
                name=f"{name} @ threshold",
                legendgroup=name,
                marker={
                    "size": 12,
                    "symbol": "x",
                    "color": score_color(colors, name) or SCORE_PALETTE[-1],
                },
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
    return plain_axes(fig)


def wrap_label(text: str, width: int = 28) -> str:
    """``text`` broken into ``<br>``-separated lines of about ``width`` characters (at ``' @ '``
    and ``', '`` first), so that neighbouring subplot titles never overlap."""
    parts = text.replace(" @ ", "\n@ ").split("\n")
    lines: list[str] = []
    for part in parts:
        line = ""
        for word in part.split(", "):
            cand = f"{line}, {word}" if line else word
            if line and len(cand) > width:
                lines.append(line + ",")
                line = word
            else:
                line = cand
        lines.append(line)
    return "<br>".join(lines)


SUMMARY_MAX_COLS = 6
"""Columns of :func:`summary_plot`'s grid; more scores (or OoD sets) wrap onto further rows."""


def grid_spacing(
    n_rows: int, n_cols: int, vertical: float, horizontal: float
) -> tuple[float, float]:
    """``(vertical, horizontal)`` subplot spacing (fractions of the plot area) for an
    ``n_rows`` x ``n_cols`` grid: the wanted values, lowered where needed to stay inside what
    ``make_subplots`` accepts (``< 1 / (n - 1)``), so that any count of panels draws."""

    def fit(wanted: float, n: int) -> float:
        return 0.0 if n < 2 else min(wanted, 0.5 / (n - 1))

    return fit(vertical, n_rows), fit(horizontal, n_cols)


def summary_plot(
    confs_ind: Any,
    confs_oods: Sequence[Any],
    *,
    scores_and_layers: Sequence[tuple[Any, Sequence[Any]]],
    oods_title: Sequence[str] | None = None,
    convex_hull: bool = False,
) -> go.Figure:
    """Seed-style grid. Top: one histogram per score, scenarios coloured (legend at the top
    right). Bottom: one ROC per OoD set, scores coloured (legend at the bottom right). At most
    :data:`SUMMARY_MAX_COLS` panels a row: more scores or OoD sets (a layer sweep) wrap onto
    further rows, and the figure grows in height, so any count draws. Subplot titles are wrapped
    (:func:`wrap_label`) so they never overlap. ``confs_ind`` ``(n_scores, n_ind)``,
    ``confs_oods[i]`` ``(n_scores, n)``."""
    from ood_core.report import score_label

    ind = _np(confs_ind)
    oods = [_np(c) for c in confs_oods]
    titles = (
        list(oods_title) if oods_title is not None else [f"OoD {i + 1}" for i in range(len(oods))]
    )
    names = [score_label(s, layers, multiline=False) for s, layers in scores_and_layers]
    n_cols = max(1, min(max(len(names), len(oods)), SUMMARY_MAX_COLS))
    hist_rows = max(1, -(-len(names) // n_cols))
    roc_rows = max(1, -(-len(oods) // n_cols))
    n_rows = hist_rows + roc_rows
    width = max(12, 110 // n_cols)
    hist_titles = [wrap_label(n, width) for n in names]
    roc_titles = [wrap_label(f"InD vs {t}", width) for t in titles]
    subplot_titles = [
        *hist_titles,
        *[""] * (hist_rows * n_cols - len(names)),
        *roc_titles,
        *[""] * (roc_rows * n_cols - len(oods)),
    ]
    n_lines = max([t.count("<br>") + 1 for t in subplot_titles] or [1])
    row_px, gap_px = 250, 60 + 16 * n_lines
    plot_px = n_rows * row_px + (n_rows - 1) * gap_px
    vertical, horizontal = grid_spacing(n_rows, n_cols, gap_px / plot_px, 0.05)
    fig = make_subplots(
        rows=n_rows,
        cols=n_cols,
        subplot_titles=subplot_titles,
        vertical_spacing=vertical,
        horizontal_spacing=horizontal,
    )
    sc_colors = scenario_colors(titles)
    s_colors = score_colors(names)
    for i in range(len(names)):
        series = {IND_NAME: ind[i], **{t: o[i] for t, o in zip(titles, oods, strict=True)}}
        row, col = 1 + i // n_cols, 1 + i % n_cols
        add_histograms(fig, series, row=row, col=col, showlegend=(i == 0), colors=sc_colors)
    for j, ood in enumerate(oods):
        curves = {n: (ind[i], ood[i]) for i, n in enumerate(names)}
        row, col = 1 + hist_rows + j // n_cols, 1 + j % n_cols
        add_rocs(
            fig,
            curves,
            row=row,
            col=col,
            convex_hull=convex_hull,
            showlegend=(j == 0),
            colors=s_colors,
            legend="legend2",
        )
        fig.update_xaxes(title_text="FPR", range=[0, 1], row=row, col=col)
        fig.update_yaxes(title_text="TPR" if col == 1 else None, range=[0, 1.02], row=row, col=col)
    fig.update_annotations(font_size=12)
    top = 70 + 16 * n_lines
    fig.update_layout(
        height=plot_px + top + 80,
        barmode="overlay",
        margin={"t": top},
        title={
            "text": "Confidence distributions (top) and ROC curves, OoD = positive (bottom)",
            "y": 0.99,
            "yanchor": "top",
        },
        legend={"title": {"text": "dataset"}, "y": 1.0, "yanchor": "top"},
        legend2={"title": {"text": "score"}, "y": 0.0, "yanchor": "bottom"},
    )
    size = matplotlib_figsize()
    if size is not None:  # the reference tutorial sets rcParams["figure.figsize"] = (15, 9)
        w, h = size
        fig.update_layout(width=round(w * 100), height=max(round(h * 50 * n_rows), 300))
    return plain_axes(fig)


def matplotlib_figsize() -> tuple[float, float] | None:
    """``rcParams["figure.figsize"]`` (inches) when matplotlib is imported and it was changed
    from matplotlib's default, else None. :func:`summary_plot` honours it as the reference's
    matplotlib figure does (100 px per inch; the height is per two rows, as the seed's grid)."""
    mpl = sys.modules.get("matplotlib")
    if mpl is None:
        return None
    size = tuple(float(v) for v in mpl.rcParams["figure.figsize"])
    default = tuple(float(v) for v in mpl.rcParamsDefault["figure.figsize"])
    return (size[0], size[1]) if size != default and len(size) == 2 else None


def heatmap_figure(
    frame: pd.DataFrame,
    value: str = "value",
    x: str = "layers",
    y: str = "score",
    title: str = "",
    x_order: Sequence[str] | None = None,
    x_labels: Mapping[str, str] | None = None,
) -> go.Figure:
    """Heatmap of ``value`` over ``y`` x ``x`` (e.g. score x layer) with annotated cells; the
    columns in ``x_order`` (e.g. network order; the others after them, in order of appearance),
    shown as ``x_labels[column]`` (e.g. with layer names) when given."""
    pivot = frame.pivot_table(index=y, columns=x, values=value, aggfunc="mean", sort=False)
    if x_order is not None:
        known = [c for c in x_order if c in pivot.columns]
        pivot = pivot[known + [c for c in pivot.columns if c not in known]]
    if x_labels:
        pivot.columns = [x_labels.get(c, c) for c in pivot.columns]
    fig = px.imshow(
        pivot,
        text_auto=".3f",
        color_continuous_scale="Viridis",
        zmin=0,
        zmax=1,
        aspect="auto",
        title=title,
    )
    fig.update_xaxes(type="category", title_text=x)
    fig.update_yaxes(type="category", title_text=y)
    return plain_axes(fig)


FORWARD_PART = "shared forward pass"


def timings_figure(
    frame: pd.DataFrame, title: str = "Time per score", colors: Mapping[str, str] | None = None
) -> go.Figure:
    """Horizontal bars of seconds per score (columns ``score``, ``operation``, ``seconds``),
    calibration and inference stacked (inference hatched); each score in its colour
    (``colors``, :func:`score_colors`), the row :data:`FORWARD_PART` in grey."""
    colors = colors or score_colors(list(dict.fromkeys(frame["score"])))
    kind = frame["operation"].str.split(":", n=1).str[0].str.strip()
    parts = list(dict.fromkeys(frame["score"]))
    fig = go.Figure()
    for op, pattern, shown in (
        ("calibration", "", "calibration (solid)"),
        ("inference", "/", "inference (hatched)"),
    ):
        sub = frame[kind == op].groupby("score", sort=False)["seconds"].sum()
        if sub.empty:
            continue
        ys = [p for p in parts if p in sub.index]
        fig.add_trace(
            go.Bar(
                x=[float(sub[p]) for p in ys],
                y=ys,
                orientation="h",
                name=shown,
                marker={
                    "color": [
                        "#BDBDBD" if p == FORWARD_PART else score_color(colors, p) or "#666666"
                        for p in ys
                    ],
                    "pattern": {"shape": pattern, "fgcolor": "white"},
                    "line": {"color": "white", "width": 1},
                },
                hovertemplate="%{y}<br>" + op + " %{x:.3g} s<extra></extra>",
            )
        )
    fig.update_layout(
        barmode="stack",
        title=title,
        yaxis={"title": "", "autorange": "reversed"},
        xaxis_title="seconds",
        legend_title_text="operation",
    )
    return plain_axes(fig)


def image_grid_figure(
    images: Any, captions: Sequence[str], n_cols: int = 8, title: str = ""
) -> go.Figure:
    """A grid of images ``(N, C, H, W)`` in [0, 1] with captions (grey or RGB)."""
    imgs = _np(images)
    n = len(imgs)
    n_cols = max(1, min(n_cols, n))
    n_rows = max(1, -(-n // n_cols))
    vertical, horizontal = grid_spacing(n_rows, n_cols, 0.08, 0.01)
    fig = make_subplots(
        rows=n_rows,
        cols=n_cols,
        subplot_titles=list(captions)[:n],
        horizontal_spacing=horizontal,
        vertical_spacing=vertical,
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
