"""Page 4 - Results: histograms, ROC curves, metric table, threshold explorer, gallery, export.

Everything here reads the RunResult stored in session state: changing a view option recomputes
nothing (only the figures are redrawn).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ood_core import explore, pipeline, plots  # noqa: E402
from ood_core.pipeline import RunResult  # noqa: E402
from pages import common  # noqa: E402

common.init_state()
ss = st.session_state

# InD in green, then scenario colours without another green (Plotly's Set1 minus its green)
SCENARIO_COLOURS = ["#2E7D32", "#E41A1C", "#377EB8", "#984EA3", "#FF7F00", "#A65628", "#F781BF",
                    "#999999", "#17BECF", "#BCBD22"]  # fmt: skip
BEST = "background-color: #c8e6c9; font-weight: bold"
BASELINE = "background-color: #fff3e0; font-style: italic"
MODES = ["Target InD acceptance", "Raw threshold"]


# ---------------------------------------------------------------------------- helpers
def _series(result: RunResult, i: int) -> dict[str, np.ndarray]:
    """``{dataset: confidences}`` of score ``i`` (InD first), as the histograms draw them."""
    return {"InD": result.confs_ind[i]} | {
        t: c[i] for t, c in zip(result.ood_titles, result.confs_oods, strict=True)}


def _index_choice(key: str, n: int, default: int = 0) -> None:
    if not isinstance(ss.get(key), int) or not 0 <= ss[key] < n:
        ss[key] = min(default, n - 1)


def _finite_range(result: RunResult, i: int) -> tuple[float, float]:
    return plots.finite_range(list(_series(result, i).values()))


def thresholds(result: RunResult) -> dict[int, float]:
    """The threshold explorer's thresholds: per score (target acceptance) or for the chosen
    score only (raw threshold). Reads the explorer's widget state (defaults on first view)."""
    n = len(result.score_names)
    _index_choice("w.thr_score", n)
    ss.setdefault("w.thr_mode", MODES[0])
    ss.setdefault("w.thr_accept", 0.95)
    if ss["w.thr_mode"] == MODES[0]:
        acc = float(ss["w.thr_accept"])
        return {i: explore.threshold_for_acceptance(result.confs_ind[i], acc) for i in range(n)}
    i = ss["w.thr_score"]
    lo, hi = _finite_range(result, i)
    raw = ss.get("w.thr_raw")
    if not isinstance(raw, float) or not lo <= raw <= hi:
        raw = explore.threshold_for_acceptance(result.confs_ind[i], 0.95)
        ss["w.thr_raw"] = float(min(max(raw, lo), hi))
    return {i: float(ss["w.thr_raw"])}


def _chart(fig: Any, key: str, **kwargs: Any) -> Any:
    return st.plotly_chart(fig, key=key, config={"displaylogo": False}, **kwargs)


def _histogram(result: RunResult, i: int, height: int = 360) -> Any:
    """plots.histogram_figure of score ``i``, coloured per scenario, legend below."""
    fig = plots.histogram_figure(_series(result, i), title=result.score_names[i])
    for k, trace in enumerate(fig.data):
        trace.marker.color = SCENARIO_COLOURS[k % len(SCENARIO_COLOURS)]
    fig.update_layout(height=height, margin={"t": 40, "b": 10, "l": 50, "r": 10},
                      title_font_size=14, legend_title_text="",
                      legend={"orientation": "h", "y": -0.25, "x": 0, "font": {"size": 11}})  # fmt: skip
    fig.update_xaxes(title_text="confidence (higher = more InD)", title_font_size=12)
    return fig


# ---------------------------------------------------------------------------- sections
def metric_table(result: RunResult) -> None:
    st.subheader("Metrics")
    wide = pipeline.metrics_wide(result)
    metrics = [repr(m) for m in result.metrics]
    ss.setdefault("w.tbl_metric", "All metrics")
    if ss["w.tbl_metric"] not in ["All metrics", *metrics]:
        ss["w.tbl_metric"] = "All metrics"
    c1, c2 = st.columns([2, 5])
    choice = c1.selectbox("Show", ["All metrics", *metrics], key="w.tbl_metric",
                          help="All (OoD set | metric) columns, or one metric per OoD set.")  # fmt: skip
    cols = [c for c in wide.columns if c != "score"]
    if choice != "All metrics":
        cols = [c for c in cols if c.split(" | ", 1)[1] == choice]
        wide = wide[["score", *cols]].rename(columns={c: c.split(" | ", 1)[0] for c in cols})
        cols = [c.split(" | ", 1)[0] for c in cols]
        wide["mean"] = wide[cols].mean(axis=1)
        cols.append("mean")
    base = result.config.baseline
    labels = list(explore.score_labels(result.frame).drop_duplicates())
    base_label = labels[base] if base is not None and 0 <= base < len(labels) else None
    ci = explore.interval_columns(result.frame)
    if not ci.empty:
        if choice != "All metrics":
            ci = ci[[c for c in ci.columns if c.split(" | ", 1)[1] == f"{choice} CI"]]
            ci.columns = [c.split(" | ", 1)[0] + " CI" for c in ci.columns]
        wide = wide.join(ci, on="score")
        order = ["score"]
        for c in cols:
            order += [c] + ([f"{c} CI"] if f"{c} CI" in wide.columns else [])
        wide = wide[order]
    wide = wide.set_index("score")

    def mark_baseline(row: pd.Series) -> list[str]:
        return [BASELINE if row.name == base_label else "" for _ in row]

    styler = (wide.style.apply(mark_baseline, axis=1)
              .highlight_max(subset=cols, props=BEST)
              .format("{:.3f}", subset=cols))  # fmt: skip
    st.dataframe(styler, key="metric_table", width="stretch")
    note = "Best value per column in **green**"
    if base_label is not None:
        note += f"; baseline *{base_label}* in orange"
    if not ci.empty:
        note += f"; CI = {result.config.n_boot}-resample percentile bootstrap 95% intervals"
    c2.caption(note + ". OoD = positive class; higher is better.")


def histograms(result: RunResult, thr: dict[int, float]) -> None:
    st.subheader("Confidence distributions")
    st.caption("One histogram per score, InD in green; the dashed line is the threshold "
               "explorer's threshold (samples left of it are flagged OoD).")  # fmt: skip
    cols = st.columns(2)
    for i in range(len(result.score_names)):
        fig = _histogram(result, i)
        if i in thr and np.isfinite(thr[i]):
            fig.add_vline(x=thr[i], line_dash="dash", line_color="black")
        with cols[i % 2]:
            _chart(fig, key=f"hist_{i}")


def rocs(result: RunResult, thr: dict[int, float]) -> None:
    st.subheader("ROC curves")
    st.caption("One plot per OoD scenario (OoD = positive class); × marks each score's operating "
               "point at the threshold explorer's threshold.")  # fmt: skip
    cols = st.columns(2)
    for j, (title, ood) in enumerate(zip(result.ood_titles, result.confs_oods, strict=True)):
        curves = {n: (result.confs_ind[i], ood[i]) for i, n in enumerate(result.score_names)}
        points = {result.score_names[i]: explore.operating_point(result.confs_ind[i], ood[i], t)
                  for i, t in thr.items()}  # fmt: skip
        fig = plots.roc_figure(curves, title=f"InD vs {title}", operating_points=points)
        for trace in fig.data:  # one legend entry per score: the × markers share its colour
            if str(trace.name).endswith("@ threshold"):
                trace.showlegend = False
        fig.update_layout(height=420, margin={"t": 40, "b": 10, "l": 50, "r": 10},
                          title_font_size=14, legend_title_text="",
                          legend={"orientation": "h", "y": -0.2, "x": 0, "font": {"size": 11}})  # fmt: skip
        with cols[j % 2]:
            _chart(fig, key=f"roc_{j}")


def explorer(result: RunResult, thr: dict[int, float]) -> None:
    st.subheader("Threshold explorer")
    st.caption("A sample is rejected (flagged OoD) when its confidence ≤ threshold. Choose the "
               "threshold by the fraction of InD test samples to accept, or directly.")  # fmt: skip
    n = len(result.score_names)
    c1, c2, c3 = st.columns([2, 2, 3])
    c1.selectbox("Score", list(range(n)), key="w.thr_score",
                 format_func=lambda i: result.score_names[i])  # fmt: skip
    c2.radio("Threshold from", MODES, key="w.thr_mode")
    i = ss["w.thr_score"]
    if ss["w.thr_mode"] == MODES[0]:
        c3.slider("InD acceptance (TPR on InD)", 0.5, 1.0, step=0.005, key="w.thr_accept",
                  help="Fraction of InD test samples accepted; the threshold is the matching "
                       "quantile of the InD confidences.")  # fmt: skip
    else:
        lo, hi = _finite_range(result, i)
        c3.slider("Threshold", lo, hi, step=(hi - lo) / 500 or None, key="w.thr_raw",
                  format="%.4g")  # fmt: skip
    t = thr.get(i, next(iter(thr.values())))
    st.markdown(f"**Threshold** for {result.score_names[i]}: `{t:.6g}`")
    summary = []
    cols = st.columns(2, gap="large")
    for j, (title, ood) in enumerate(zip(result.ood_titles, result.confs_oods, strict=True)):
        cm = explore.confusion(result.confs_ind[i], ood[i], t)
        summary.append({"OoD scenario": title, "InD accepted": 100 * cm.ind_acceptance,
                        "OoD rejected (TPR)": 100 * cm.ood_rejection, "FPR": 100 * cm.fpr})  # fmt: skip
        with cols[j % 2]:
            st.markdown(f"**InD vs {title}**")
            c1, c2 = st.columns([1, 1])
            c1.dataframe(cm.matrix(), key=f"cm_{j}", width="stretch")
            c2.metric("InD accepted", f"{cm.ind_acceptance:.1%}", help="1 - FPR")
            c2.metric("OoD rejected", f"{cm.ood_rejection:.1%}", help="TPR (OoD = positive)")
    st.markdown("**All scenarios at this threshold**")
    st.dataframe(pd.DataFrame(summary), hide_index=True, key="thr_summary", column_config={
        k: st.column_config.NumberColumn(k, format="%.1f %%") for k in
        ("InD accepted", "OoD rejected (TPR)", "FPR")})  # fmt: skip


def _grid(images: Any, conf: np.ndarray, idx: np.ndarray, title: str, result: RunResult,
          ind: bool, n_cols: int = 4) -> None:  # fmt: skip
    if len(idx) == 0:
        st.caption(f"{title}: no samples.")
        return
    names = result.ind.class_names
    caps = []
    for k in idx:
        cap = f"{conf[k]:.3g}"
        if ind:
            y = int(result.ind.labels[k])
            cap = f"{names[y] if y < len(names) else y}<br>{cap}"
        caps.append(cap)
    fig = plots.image_grid_figure(images[np.asarray(idx)], caps, n_cols=n_cols, title=title)
    st.plotly_chart(fig, key=f"grid_{title}", config={"displayModeBar": False})


def gallery(result: RunResult) -> None:
    st.subheader("Gallery")
    n = len(result.score_names)
    _index_choice("w.gal_score", n)
    _index_choice("w.gal_ood", len(result.ood_titles))
    ss.setdefault("w.gal_k", 8)
    c1, c2, c3 = st.columns([3, 3, 2])
    c1.selectbox("Score", list(range(n)), key="w.gal_score",
                 format_func=lambda i: result.score_names[i])  # fmt: skip
    c2.selectbox("OoD scenario", list(range(len(result.ood_titles))), key="w.gal_ood",
                 format_func=lambda j: result.ood_titles[j])  # fmt: skip
    c3.slider("Images per grid", 4, 24, step=4, key="w.gal_k")
    i, j, k = ss["w.gal_score"], ss["w.gal_ood"], int(ss["w.gal_k"])
    ind_conf, ood_conf = np.asarray(result.confs_ind[i]), np.asarray(result.confs_oods[j][i])
    left, right = st.columns(2, gap="large")
    with left:
        st.markdown("**InD test samples**")
        _grid(result.ind.images, ind_conf, explore.extreme_indices(ind_conf, k, most=True),
              "InD: most confident", result, ind=True)  # fmt: skip
        _grid(result.ind.images, ind_conf, explore.extreme_indices(ind_conf, k, most=False),
              "InD: least confident", result, ind=True)  # fmt: skip
    with right:
        st.markdown(f"**{result.ood_titles[j]}**")
        imgs = result.ood_images[j]
        _grid(imgs, ood_conf, explore.extreme_indices(ood_conf, k, most=True),
              "OoD: most confident (missed)", result, ind=False)  # fmt: skip
        _grid(imgs, ood_conf, explore.extreme_indices(ood_conf, k, most=False),
              "OoD: least confident", result, ind=False)  # fmt: skip
    st.markdown("**Select bars or drag a box** in this histogram to see the samples behind them "
                "(double-click the plot to clear).")
    series = _series(result, i)
    fig = _histogram(result, i, height=380)
    fig.update_layout(dragmode="select")
    event = _chart(fig, key=f"sel_hist_{i}", on_select="rerun", selection_mode=("points", "box"))
    selection = event.get("selection") if hasattr(event, "get") else None
    picked = explore.selection_to_indices(selection, series)
    if not picked:
        st.caption("Nothing selected yet.")
        return
    images = {"InD": result.ind.images} | dict(zip(result.ood_titles, result.ood_images, strict=True))
    for name, idx in picked.items():
        st.markdown(f"{name}: {len(idx)} selected sample(s)" + (", showing 24" if len(idx) > 24 else ""))
        _grid(images[name], np.asarray(series[name]), idx[:24], f"Selected: {name}", result,
              ind=(name == "InD"), n_cols=8)  # fmt: skip


def layers_and_timings(result: RunResult) -> None:
    st.subheader("Layer × score heatmap")
    metrics = [repr(m) for m in result.metrics]
    c1, c2 = st.columns(2)
    _index_choice("w.hm_metric", len(metrics))
    _index_choice("w.hm_ood", len(result.ood_titles) + 1)
    c1.selectbox("Metric", list(range(len(metrics))), key="w.hm_metric",
                 format_func=lambda k: metrics[k])  # fmt: skip
    oods = ["mean over OoD sets", *result.ood_titles]
    c2.selectbox("OoD set", list(range(len(oods))), key="w.hm_ood", format_func=lambda k: oods[k])
    metric = metrics[ss["w.hm_metric"]]
    ood = None if ss["w.hm_ood"] == 0 else result.ood_titles[ss["w.hm_ood"] - 1]
    frame = explore.heatmap_frame(result.frame, metric, ood)
    if frame.empty:
        st.info("No score ran on several layer sets. On the Scores page, tick *Evaluate each "
                "layer separately* for a score with several layers to compare layers here.",
                icon=":material/info:")  # fmt: skip
    else:
        fig = plots.heatmap_figure(frame, title=f"{metric} · {oods[ss['w.hm_ood']]}")
        _chart(fig, key="heatmap")
    st.subheader("Timings")
    if result.timings.empty:
        st.info("Everything came from the cache in this run: no score was fitted or evaluated.",
                icon=":material/info:")  # fmt: skip
    else:
        fig = plots.timings_figure(result.timings)
        fig.update_layout(height=max(300, 60 * result.timings["score"].nunique() + 120))
        _chart(fig, key="timings")
        st.caption(f"Scores computed in this run; total run time {result.seconds:.1f} s.")


def export(result: RunResult) -> None:
    st.subheader("Export")
    st.caption("The config replays this run without a browser: `ood-lens run config.toml --out DIR`.")
    c1, c2, c3, c4 = st.columns(4)
    c1.download_button("Metrics (CSV)", result.frame.to_csv(index=False), "metrics.csv",
                       mime="text/csv", key="dl_csv", icon=":material/table:", on_click="ignore")  # fmt: skip
    c2.download_button("Confidences (parquet)", common.parquet_bytes(result.confidences_frame()),
                       "confidences.parquet", mime="application/octet-stream", key="dl_parquet",
                       icon=":material/database:", on_click="ignore")  # fmt: skip
    c3.download_button("Report (HTML)", lambda: common.export_bundle(result)["report"],
                       "report.html", mime="text/html", key="dl_html",
                       icon=":material/description:", on_click="ignore",
                       help="A self-contained HTML page (figures and tables, works offline); "
                            "built when you click.")  # fmt: skip
    toml, problem = common.config_toml(result)
    c4.download_button("Run config (TOML)", toml or "", "config.toml", mime="application/toml",
                       key="dl_toml", icon=":material/settings:", disabled=toml is None,
                       on_click="ignore")  # fmt: skip
    if problem:
        st.warning(problem, icon=":material/warning:")


def no_result() -> None:
    st.info("No results yet. Run the default evaluation (or set one up on the previous pages).",
            icon=":material/info:")  # fmt: skip
    if st.button("Run the default evaluation", key="run_default", type="primary",
                 icon=":material/play_arrow:"):  # fmt: skip
        config, problems = common.build_config()
        if config is None:
            for where, msgs in problems.items():
                for msg in msgs:
                    st.error(f"{where}: {msg}", icon=":material/error:")
            return
        if common.execute_run(config) is None:
            st.error(ss["run_error"], icon=":material/error:")
            return
        st.rerun()


def body() -> None:
    common.header("Results", "Distributions, ROC curves, metrics, thresholds and images of the "
                  "last run; view options here recompute nothing.")  # fmt: skip
    result: RunResult | None = ss.get("result")
    if result is None:
        no_result()
        return
    cfg = result.config
    st.markdown(f"`{cfg.model_entry}` on {len(result.ind)} InD test samples (accuracy "
                f"**{result.accuracy:.2%}**), {len(result.score_names)} score(s) × "
                f"{len(result.ood_titles)} OoD scenario(s) · run time **{result.seconds:.1f} s**")
    for message in result.notes:  # e.g. sizes lowered to what the data holds
        st.info(message, icon=":material/info:")
    for message in result.warnings:  # degenerate fits / tied sets: the numbers they concern
        st.warning(message, icon=":material/warning:")
    thr = thresholds(result)
    tabs = st.tabs(["Overview", "Threshold explorer", "Gallery", "Layers & timings", "Export"])
    with tabs[0]:
        common.guard(lambda: metric_table(result))
        common.guard(lambda: histograms(result, thr))
        common.guard(lambda: rocs(result, thr))
    with tabs[1]:
        common.guard(lambda: explorer(result, thr))
    with tabs[2]:
        common.guard(lambda: gallery(result))
    with tabs[3]:
        common.guard(lambda: layers_and_timings(result))
    with tabs[4]:
        common.guard(lambda: export(result))


common.guard(body)
