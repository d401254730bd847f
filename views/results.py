"""Page "Results": histograms, ROC curves, metric table, threshold explorer, gallery, export.

Everything here reads the RunResult stored in session state: changing a view option recomputes
nothing (only the figures are redrawn).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from ood_core import plots
from ood_core.config import IND_TITLE
from ood_core.core import predicted_classes
from ood_core.metrics import plain_metric_name
from ood_core.runner import RunResult
from ood_lens_app import form, layout, loaders, result_views, runs, state, study, view_url
from ood_lens_app.result_views import ALL_METRICS, THRESHOLD_MODES, index_choice, name_choice

state.init_state()
ss = st.session_state

BEST = "background-color: #c8e6c9; font-weight: bold"
BASELINE = "background-color: #fff3e0; font-style: italic"
RESULT_TAB = view_url.TAB_KEY
LEGEND_BELOW = {"orientation": "h", "x": 0, "font": {"size": 11}}


def _chart(fig: Any, key: str, **kwargs: Any) -> Any:
    """A Plotly chart whose toolbar camera downloads an SVG (vector, for reports) named
    ``ood-lens-<key>.svg``."""
    config = {
        "displaylogo": False,
        "toImageButtonOptions": {"format": "svg", "filename": f"ood-lens-{key}"},
    }
    return st.plotly_chart(fig, key=key, config=config, **kwargs)


def _scenario_colors(result: RunResult) -> dict[str, str]:
    return plots.scenario_colors(result.ood_titles)


def _score_colors(result: RunResult) -> dict[str, str]:
    return plots.score_colors(result.score_names)


def _histogram(result: RunResult, i: int, height: int = 360, threshold: float | None = None) -> Any:
    """plots.histogram_figure of score ``i`` (InD first, scenario colours), legend below, with
    the threshold line (in the score's colour) when given."""
    fig = plots.histogram_figure(
        result_views.series(result, i),
        title=result.score_names[i],
        colors=_scenario_colors(result),
    )
    fig.update_layout(
        height=height,
        margin={"t": 40, "b": 10, "l": 50, "r": 10},
        title_font_size=14,
        legend_title_text="",
        legend=LEGEND_BELOW | {"y": -0.3, "yanchor": "top"},
    )
    fig.update_xaxes(
        title_text="confidence (higher = more InD)", title_font_size=12, title_standoff=4
    )
    if threshold is not None and np.isfinite(threshold):
        color = _score_colors(result)[result.score_names[i]]
        fig.add_vline(x=threshold, line_dash="dash", line_color=color, line_width=2)
    return fig


# ---------------------------------------------------------------------------- sections
def metric_table(result: RunResult) -> None:
    st.subheader("Headline")
    options = [repr(m) for m in result.metrics]
    if ss.get("w.tbl_metric") not in options:
        ss["w.tbl_metric"] = result_views.headline_metric(result)
    c1, c2 = st.columns([2, 5])
    choice = c1.selectbox(
        "Metric",
        options,
        key="w.tbl_metric",
        format_func=lambda m: f"{plain_metric_name(m)}  ·  {m}",
        help="The metric of the headline table: one column per OoD scenario and their mean. "
        "Each is named as readers know it, then as ood-lens writes it (CSV, config).",
    )
    head = result_views.headline_table(result, choice)
    best = {c: head.values[c].max() for c in head.values.columns}

    def paint(col: Any) -> list[str]:
        vals = head.values[col.name]
        return [
            BEST if len(vals) > 1 and v == best[col.name] else (BASELINE if r == base else "")
            for r, v in vals.items()
        ]

    base = head.baseline_label
    st.table(head.text.style.apply(paint, axis=0))
    note = f"**{plain_metric_name(choice)}** (`{choice}`) per OoD scenario; best per column in **green**"
    if base is not None:
        note += f", baseline *{base}* in orange"
    if head.has_intervals:
        note += (
            f"; ± = half the width of the {result.config.n_boot}-resample percentile "
            "bootstrap 95% interval"
        )
    c2.caption(note + ". OoD = positive class; higher is better.")
    with st.expander("Full table: every metric × scenario"):
        table = result_views.metric_table(result, ALL_METRICS)
        styler = (
            table.frame.style.apply(
                lambda row: [BASELINE if row.name == table.baseline_label else ""] * len(row),
                axis=1,
            )
            .highlight_max(subset=table.value_columns, props=BEST)
            .format("{:.3f}", subset=table.value_columns)
        )
        st.dataframe(styler, key="metric_table", width="stretch")
        if table.has_intervals:
            st.caption(f"CI = {result.config.n_boot}-resample percentile bootstrap 95% intervals.")


def histograms(result: RunResult, thr: dict[int, float]) -> None:
    st.subheader("Confidence distributions")
    st.caption(
        "One histogram per score, each scenario in its own colour (InD always green); the "
        "dashed line is the threshold explorer's threshold (samples left of it are flagged OoD)."
    )
    cols = st.columns(2)
    for i in range(len(result.score_names)):
        fig = _histogram(result, i, threshold=thr.get(i))
        with cols[i % 2]:
            _chart(fig, key=f"hist_{i}")


def rocs(result: RunResult, thr: dict[int, float]) -> None:
    st.subheader("ROC curves")
    st.caption(
        "One plot per OoD scenario (OoD = positive class); × marks each score's operating "
        "point at the threshold explorer's threshold."
    )
    cols = st.columns(2)
    sc_colors, s_colors = _scenario_colors(result), _score_colors(result)
    for j, (title, ood) in enumerate(zip(result.ood_titles, result.confs_oods, strict=True)):
        curves = {n: (result.confs_ind[i], ood[i]) for i, n in enumerate(result.score_names)}
        fig = plots.roc_figure(
            curves,
            title=f"InD vs {title}",
            operating_points=result_views.operating_points(result, j, thr),
            colors=s_colors,
        )
        for trace in fig.data:  # one legend entry per score: the × markers share its colour
            if str(trace.name).endswith("@ threshold"):
                trace.showlegend = False
        shown = sum(1 for t in fig.data if t.showlegend is not False)
        fig.update_layout(
            height=plots.height_for_legend(shown),
            margin={"t": 40, "b": 10, "l": 50, "r": 10},
            title={"font": {"size": 14, "color": sc_colors[title]}},
            legend=LEGEND_BELOW
            | {"y": -0.2, "title": {"text": f"■ {title}", "font": {"color": sc_colors[title]}}},
        )
        with cols[j % 2]:
            _chart(fig, key=f"roc_{j}")


def explorer(result: RunResult, thr: dict[int, float]) -> None:
    st.subheader("Threshold explorer")
    st.caption(
        "A sample is rejected (flagged OoD) when its confidence ≤ threshold. Choose the "
        "threshold by the fraction of InD test samples to accept, or directly."
    )
    c1, c2, c3 = st.columns([2, 2, 3])
    c1.selectbox(
        "Score",
        list(range(len(result.score_names))),
        key="w.thr_score",
        format_func=lambda i: result.score_names[i],
    )
    c2.radio("Threshold from", THRESHOLD_MODES, key="w.thr_mode")
    i = ss["w.thr_score"]
    if ss["w.thr_mode"] == THRESHOLD_MODES[0]:
        c3.slider(
            "InD acceptance (1 - FPR)",
            0.5,
            1.0,
            step=0.005,
            key="w.thr_accept",
            help="Fraction of InD test samples accepted; the threshold is the matching "
            "quantile of the InD confidences.",
        )
    else:
        lo, hi = plots.finite_range(list(result_views.series(result, i).values()))
        c3.slider("Threshold", lo, hi, step=(hi - lo) / 500 or None, key="w.thr_raw", format="%.4g")
    t = thr.get(i, next(iter(thr.values())))
    rows = result_views.confusion_rows(result, i, t)
    left, right = st.columns([1, 1], gap="large")
    with left:
        _chart(_histogram(result, i, height=360, threshold=t), key="thr_hist")
    with right:
        st.markdown(f"**Threshold** for {result.score_names[i]}: `{t:.6g}`")
        if rows:
            c = rows[0]
            n_ind = c.ind_accepted + c.ind_rejected
            st.metric(
                "InD accepted",
                f"{c.ind_acceptance:.1%}",
                help=f"{c.ind_accepted:,} of {n_ind:,} InD test samples (1 - FPR). The "
                "threshold is set on these same samples: the report's operating points can set "
                "it on a held-out half.",
            )
        st.dataframe(
            result_views.confusion_summary(result.ood_titles, rows).drop(columns="FPR"),
            hide_index=True,
            key="thr_summary",
            width="stretch",
            column_config={
                k: st.column_config.NumberColumn(k, format="%.1f %%")
                for k in ("InD accepted", "OoD rejected (TPR)")
            },
        )


def _grid(
    images: Any,
    conf: np.ndarray,
    idx: np.ndarray,
    title: str,
    result: RunResult,
    ind: bool,
    n_cols: int = 4,
) -> None:
    if len(idx) == 0:
        st.caption(f"{title}: no samples.")
        return
    predicted = None
    if not ind and (net := _network(result)) is not None:
        predicted = predicted_classes(net, images[np.asarray(idx)])
    caps = result_views.confidence_captions(
        conf,
        idx,
        result.ind.labels.tolist() if ind else None,
        result.ind.class_names,
        predicted=predicted,
    )
    fig = plots.image_grid_figure(images[np.asarray(idx)], caps, n_cols=n_cols, title=title)
    st.plotly_chart(fig, key=f"grid_{title}", config={"displayModeBar": False})


def _network(result: RunResult) -> Any:
    """The run's network (read through its config's output) from the session's run cache
    (None when it is not there)."""
    cache = ss.get("run_cache")
    return cache.network(result.config) if cache is not None else None


def gallery(result: RunResult, thr: dict[int, float]) -> None:
    st.subheader("Gallery")
    n = len(result.score_names)
    name_choice(ss, "w.gal_score", result.score_names)
    index_choice(ss, "w.gal_ood", len(result.ood_titles))
    ss.setdefault("w.gal_k", 8)
    c1, c2, c3 = st.columns([3, 3, 2])
    c1.selectbox(
        "Score", list(range(n)), key="w.gal_score", format_func=lambda i: result.score_names[i]
    )
    c2.selectbox(
        "OoD scenario",
        list(range(len(result.ood_titles))),
        key="w.gal_ood",
        format_func=lambda j: result.ood_titles[j],
    )
    c3.slider("Images per grid", 4, 24, step=4, key="w.gal_k")
    i, j, k = ss["w.gal_score"], ss["w.gal_ood"], int(ss["w.gal_k"])
    ind_conf, ood_conf = np.asarray(result.confs_ind[i]), np.asarray(result.confs_oods[j][i])
    extreme = result_views.extreme_indices
    left, right = st.columns(2, gap="large")
    with left:
        st.markdown("**InD test samples**")
        _grid(
            result.ind.images,
            ind_conf,
            extreme(ind_conf, k, most=True),
            "InD: most confident",
            result,
            ind=True,
        )
        _grid(
            result.ind.images,
            ind_conf,
            extreme(ind_conf, k, most=False),
            "InD: least confident",
            result,
            ind=True,
        )
    with right:
        st.markdown(f"**{result.ood_titles[j]}**")
        imgs = result.ood_images[j]
        t = thr.get(i, next(iter(thr.values())))
        passing = result_views.undetected_frame(ood_conf, t)["sample"].to_numpy()
        st.caption(
            f"At the threshold explorer's threshold `{t:.4g}` for this score, "
            f"{len(passing):,} of {len(ood_conf):,} OoD samples pass as InD (undetected)."
        )
        _grid(
            imgs,
            ood_conf,
            passing[:k],
            "OoD: passing undetected, most confident first",
            result,
            ind=False,
        )
        if len(passing):
            st.download_button(
                "Undetected samples (CSV)",
                result_views.undetected_frame(ood_conf, t).to_csv(index=False).encode(),
                file_name="undetected.csv",
                mime="text/csv",
                key="gal_undetected_csv",
                icon=":material/download:",
            )
        _grid(
            imgs,
            ood_conf,
            extreme(ood_conf, k, most=False),
            "OoD: least confident",
            result,
            ind=False,
        )
    st.markdown(
        "**Drag a box** over this histogram to see exactly the samples whose confidence lies "
        "in its x-range (or click a bar; double-click the plot to clear). OoD thumbnails show "
        "the predicted class."
    )
    series = result_views.series(result, i)
    fig = _histogram(result, i, height=380)
    fig.update_layout(dragmode="select")
    event = _chart(fig, key=f"sel_hist_{i}", on_select="rerun", selection_mode=("points", "box"))
    selection = event.get("selection") if hasattr(event, "get") else None
    picked = result_views.selection_to_indices(selection, series)
    if not picked:
        st.caption("Nothing selected yet.")
        return
    images = {IND_TITLE: result.ind.images} | dict(
        zip(result.ood_titles, result.ood_images, strict=True)
    )
    for name, idx in picked.items():
        st.markdown(
            f"{name}: {len(idx)} selected sample(s)" + (", showing 24" if len(idx) > 24 else "")
        )
        _grid(
            images[name],
            np.asarray(series[name]),
            idx[:24],
            f"Selected: {name}",
            result,
            ind=(name == IND_TITLE),
            n_cols=8,
        )


def layers_and_timings(result: RunResult) -> None:
    st.subheader("Layer × score heatmap")
    metrics = [repr(m) for m in result.metrics]
    oods = ["mean over OoD sets", *result.ood_titles]
    index_choice(ss, "w.hm_metric", len(metrics))
    index_choice(ss, "w.hm_ood", len(oods))
    c1, c2 = st.columns(2)
    c1.selectbox(
        "Metric",
        list(range(len(metrics))),
        key="w.hm_metric",
        format_func=lambda k: f"{plain_metric_name(metrics[k])}  ·  {metrics[k]}",
    )
    c2.selectbox("OoD set", list(range(len(oods))), key="w.hm_ood", format_func=lambda k: oods[k])
    metric = metrics[ss["w.hm_metric"]]
    ood = None if ss["w.hm_ood"] == 0 else result.ood_titles[ss["w.hm_ood"] - 1]
    frame = result_views.heatmap_frame(result.frame, metric, ood)
    order, labels = result_views.layer_columns(result.scores_and_layers)
    if frame.empty:
        st.info(
            "No score ran on several layer sets. On the Scores page, tick *Evaluate each "
            "layer separately* for a score with several layers to compare layers here.",
            icon=":material/info:",
        )
    else:
        fig = plots.heatmap_figure(
            frame,
            title=f"{metric} · {oods[ss['w.hm_ood']]} (layers in network order)",
            x_order=order,
            x_labels=labels,
        )
        _chart(fig, key="heatmap")
    st.subheader("Timings")
    if result.timings.empty:
        st.info(
            "Everything came from the cache in this run: no score was fitted or evaluated.",
            icon=":material/info:",
        )
    else:
        parts, split = result_views.timings_parts(result.timings)
        fig = plots.timings_figure(parts, colors=_score_colors(result))
        fig.update_layout(height=max(300, 60 * parts["score"].nunique() + 120))
        _chart(fig, key="timings")
        how = (
            "the shared forward pass (grey) apart from each score's own time"
            if split
            else "each score's time includes an equal share of the shared forward pass"
        )
        st.caption(
            f"Scores computed in this run, in their colours; {how}. Total run time "
            f"{result.seconds:.1f} s."
        )


def export(result: RunResult) -> None:
    st.subheader("Export")
    st.caption(
        "The config replays this run without a browser: `ood-lens run config.toml --out DIR`."
    )
    c1, c2, c3, c4 = st.columns(4)
    c1.download_button(
        "Metrics (CSV)",
        result.frame.to_csv(index=False),
        "metrics.csv",
        mime="text/csv",
        key="dl_csv",
        icon=":material/table:",
        on_click="ignore",
    )
    c2.download_button(
        "Confidences (parquet)",
        runs.parquet_bytes(result.confidences_frame()),
        "confidences.parquet",
        mime="application/octet-stream",
        key="dl_parquet",
        icon=":material/database:",
        on_click="ignore",
    )
    c3.download_button(
        "Report (HTML)",
        lambda: runs.export_bundle(result)["report"],
        "report.html",
        mime="text/html",
        key="dl_html",
        icon=":material/description:",
        on_click="ignore",
        help="A self-contained HTML page (figures and tables, works offline); "
        "built when you click.",
    )
    toml, problem = runs.config_toml(result)
    c4.download_button(
        "Run config (TOML)",
        toml or "",
        "config.toml",
        mime="application/toml",
        key="dl_toml",
        icon=":material/settings:",
        disabled=toml is None,
        on_click="ignore",
    )
    if problem:
        st.warning(problem, icon=":material/warning:")


def no_result() -> None:
    st.info(
        "No results yet. Run the default evaluation (or set one up on the previous pages).",
        icon=":material/info:",
    )
    if st.button(
        "Run the default evaluation",
        key="run_default",
        type="primary",
        icon=":material/play_arrow:",
    ):
        config, problems = form.build_config(ss, loaders.current_layer_choices())
        if config is None:
            for where, msgs in problems.items():
                for msg in msgs:
                    st.error(f"{where}: {msg}", icon=":material/error:")
            return
        if runs.execute_run(config) is None:
            st.error(ss["run_error"], icon=":material/error:")
            return
        st.rerun()


def study_view(result: RunResult) -> None:
    """Which layer or parameter value is best, and by how much (:mod:`ood_lens_app.study`)."""
    st.subheader("Layer and parameter study")
    metrics = [repr(m) for m in result.metrics]
    if ss.get("w.st_metric") not in metrics:
        ss["w.st_metric"] = result_views.headline_metric(result)
    oods = [study.MEAN, *result.ood_titles]
    if ss.get("w.st_ood") not in oods:
        ss["w.st_ood"] = study.MEAN
    c1, c2 = st.columns(2)
    metric = c1.selectbox(
        "Metric",
        metrics,
        key="w.st_metric",
        format_func=lambda m: f"{plain_metric_name(m)}  ·  {m}",
    )
    ood = c2.selectbox("OoD set", oods, key="w.st_ood")
    table = study.study_frame(result.frame, metric, ood)
    if table.empty:
        st.info(
            "This run has no sweep. On *Scores & scenarios*, open a score and tick *Evaluate each "
            "layer separately* (one score per layer), or sweep one of its parameters over a list "
            "of values; one Run then computes every point with one forward pass per dataset.",
            icon=":material/insights:",
        )
        return
    head = result_views.headline_table(result, metric)
    base = None
    if head.baseline_label is not None:
        column = result_views.MEAN if ood == study.MEAN else ood
        base = float(head.values.at[head.baseline_label, column])
    title = plain_metric_name(metric) + ("" if ood == study.MEAN else f" on {ood}")
    _chart(study.study_figure(table, title), "study_chart")
    best = study.ranking(table, base, head.baseline_label)
    st.dataframe(
        study.ranking_text(best),
        hide_index=True,
        key="study_best",
        width="stretch",
    )
    note = (
        "Best first; margins are differences of the metric. The chart's camera icon saves an SVG."
    )
    if head.baseline_label is not None:
        note += f" Baseline: *{head.baseline_label}*."
    if ood == study.MEAN:
        note += " Choose one OoD set to see bootstrap intervals (when the run has them)."
    elif not table["ci_low"].notna().any():
        note += " No intervals: set a bootstrap (n_boot) on the Scores page to judge close points."
    st.caption(note)
    st.download_button(
        "Study (CSV)",
        table.to_csv(index=False).encode(),
        file_name="study.csv",
        mime="text/csv",
        key="study_csv",
        icon=":material/download:",
    )


def warnings_panel(messages: list[str]) -> None:
    """Degenerate fits and tied sets, grouped per score in one collapsed panel (one line on
    screen: the headline stays above the fold)."""
    groups = result_views.grouped_warnings(messages)
    if not groups:
        return
    n = sum(len(v) for v in groups.values())
    title = f"{n} warning{'s' * (n != 1)} about {', '.join(groups)}: what they mean for the numbers"
    with st.expander(title, icon=":material/warning:", expanded=False):
        for score, lines in groups.items():
            st.markdown(f"**{score}**\n" + "\n".join(f"- {line}" for line in lines))


def body() -> None:
    layout.header(
        "Results",
        "Distributions, ROC curves, metrics, thresholds and images of the "
        "last run; view options here recompute nothing.",
    )
    result: RunResult | None = ss.get("result")
    if result is None:
        no_result()
        return
    st.markdown(
        f"`{result.config.model_entry}` on {len(result.ind)} InD test samples (accuracy "
        f"**{result.accuracy:.2%}**), {len(result.score_names)} score(s) × "
        f"{len(result.ood_titles)} OoD scenario(s) · run time **{result.seconds:.1f} s**"
    )
    for message in result.notes:  # e.g. sizes lowered to what the data holds
        st.info(message, icon=":material/info:")
    warnings_panel(result.warnings)
    # lazy tabs: only the open one is computed and sent to the browser (a re-run redraws one
    # tab's charts, not all five); the open tab is kept across re-runs (key)
    sections = {
        "Overview": lambda: (metric_table(result), histograms(result, thr), rocs(result, thr)),
        "Threshold explorer": lambda: explorer(result, thr),
        "Gallery": lambda: gallery(result, thr),
        "Study": lambda: study_view(result),
        "Layers & timings": lambda: layers_and_timings(result),
        "Export": lambda: export(result),
    }
    # a reload or a shared link reopens the same view (tab, explorer score and threshold)
    view_url.read(ss, st.query_params, ss.get("run_id"), list(sections), result.score_names)
    thr = result_views.explorer_thresholds(result, ss)
    if ss.get(RESULT_TAB) not in sections:
        ss[RESULT_TAB] = "Overview"
    tabs = st.tabs(list(sections), key=RESULT_TAB, on_change="rerun")
    for tab, draw in zip(tabs, sections.values(), strict=True):
        if tab.open:
            with tab:
                layout.guard(draw)
    view_url.write(ss, st.query_params, result.score_names)


layout.guard(body)
