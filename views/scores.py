"""Page "Scores & scenarios": detectors and their parameters, OoD scenarios, metrics, Run."""

from __future__ import annotations

import functools
import re

import pandas as pd
import streamlit as st

from ood_core import data as data_mod
from ood_core.config import RunConfig
from ood_core.perturbations import list_perturbations
from ood_core.scores import get_score_class, list_scores
from ood_lens_app import estimates, form, layers, layout, loaders, runs, state, widgets
from ood_lens_app.form import Problems
from ood_lens_app.state import (
    param_sweep_key,
    param_sweep_values_key,
    pert_owner,
    score_layer_key,
    sweep_key,
)

state.init_state()
ss = st.session_state

RULE_TEXT = {
    "none": "uses logits only",
    "any": "reads any layers",
    "params": "needs layers holding parameters (gradients)",
}


@st.cache_data(show_spinner=False)
def score_rows() -> list[dict]:
    return list_scores()


def _score_expander(row: dict, choices: layers.LayerChoices, problems: Problems) -> None:
    name = row["name"]
    cls = get_score_class(name)
    options = layers.sync_score_layers(ss, name, cls.layer_rule, cls.max_layers, choices)
    params, _ = form.param_values(ss, name, row["params"])
    shown = ", ".join(f"{k}={v}" for k, v in params.items())
    key = score_layer_key(name)
    chosen = ss.get(key, []) if cls.layer_rule != "none" else []
    where = ("layers " + ", ".join(chosen)) if chosen else "logits only"
    title = f"**{name}**{f'({shown})' if shown else ''} · {where} · *{row['family']}*"
    bad = name in problems
    opened = widgets.is_open(ss, name)
    keep_open = functools.partial(widgets.mark_open, ss, name)
    sweep_changed = functools.partial(widgets.sweep_changed, ss, name)
    with st.expander(title, expanded=bad or opened, icon=":material/error:" if bad else None):
        doc = re.sub(r":\w+:`", "`", row["doc"])  # drop reST roles such as :func:
        st.caption(f"{doc} ({row['reference']})")
        if cls.layer_rule == "none":
            st.multiselect(
                "Layers",
                [],
                key=f"disabled_layers_{name}",
                disabled=True,
                placeholder="uses logits only",
                help="This score reads the logits.",
            )
        else:
            names = choices.names()
            st.multiselect(
                "Layers",
                options,
                key=key,
                on_change=keep_open,
                max_selections=cls.max_layers,
                format_func=lambda lid: f"{lid} · {names.get(lid, '')}",
                help=f"{name} {RULE_TEXT[cls.layer_rule]}"
                + (f", at most {cls.max_layers}" if cls.max_layers else "")
                + ". Defaults to the Layers page selection.",
            )
            if len(ss.get(key, [])) > 1:
                st.checkbox(
                    "Evaluate each layer separately (layer sweep)",
                    key=sweep_key(name),
                    on_change=sweep_changed,
                    help="One score per layer instead of one score on all of them; the "
                    "Results page then shows a layer heatmap.",
                )
        widgets.param_widgets(name, row["params"], on_change=keep_open)
        sweepable = [d["name"] for d in row["params"] if d["type"] in form.SWEEPABLE]
        if sweepable:
            c1, c2 = st.columns([1, 2])
            c1.selectbox(
                "Sweep a parameter",
                ["", *sweepable],
                key=param_sweep_key(name),
                format_func=lambda p: p or "no sweep",
                on_change=sweep_changed,
                help="One score per value in one Run (one forward pass per dataset for all); "
                "the Results page's Study tab then shows the metric against the value.",
            )
            if ss.get(param_sweep_key(name)):
                c2.text_input(
                    "Values",
                    key=param_sweep_values_key(name),
                    placeholder="5, 15, 50",
                    on_change=keep_open,
                    help="Comma-separated values of the swept parameter (it overrides the "
                    "field above).",
                )
        for msg in problems.get(name, []):
            st.error(msg, icon=":material/error:")
        if not bad:  # its memory estimate before Run (what the fit checks, nothing computed)
            sweep = bool(ss.get(sweep_key(name), False))
            for kind, text in estimates.score_messages(name, params, chosen, sweep):
                if kind == "caption":
                    st.caption(text)
                else:
                    getattr(st, kind)(text, icon=":material/memory:")


def scores_section(choices: layers.LayerChoices, problems: Problems) -> None:
    rows = {r["name"]: r for r in score_rows()}
    st.subheader("Scores")
    ss["w.scores"] = [s for s in ss["w.scores"] if s in rows]
    st.multiselect(
        "Confidence scores",
        list(rows),
        key="w.scores",
        help="Each score maps an input to a confidence (higher = more in-distribution). Type to "
        "filter. Families: " + ", ".join(sorted({r["family"] for r in rows.values()})) + ".",
    )
    with st.expander(
        "Catalogue: every score, its family, layers and paper", icon=":material/menu_book:"
    ):
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "score": r["name"],
                        "family": r["family"],
                        "layers": r["layers"],
                        "fitted": r["needs_fit"],
                        "gradients": r["gradients"],
                        "paper": r["reference"],
                    }
                    for r in rows.values()
                ]
            ),
            hide_index=True,
            key="catalogue",
        )
    if not ss["w.scores"]:
        st.info("Choose at least one score.")
        return
    for name in ss["w.scores"]:
        _score_expander(rows[name], choices, problems)


def scenarios_section(problems: Problems) -> None:
    st.subheader("OoD scenarios")
    perts = {r["key"]: r for r in list_perturbations()}
    ss["w.perts"] = [k for k in ss["w.perts"] if k in perts]
    st.multiselect(
        "Perturbations of the InD test images",
        list(perts),
        key="w.perts",
        format_func=lambda k: perts[k]["title"],
        help="Each builds an OoD set from the InD test samples.",
    )
    for kind in ss["w.perts"]:
        row = perts[kind]
        if descs := [p.as_dict() for p in row["params"]]:
            owner = pert_owner(kind)
            with st.expander(f"{row['title']}: parameters", expanded=widgets.is_open(ss, owner)):
                st.caption(row["help"])
                widgets.param_widgets(owner, descs)
    bundled = [
        d["name"]
        for d in data_mod.list_bundled()
        if "test" in d["splits"] and d["name"] != ss["ind_source"]
    ]
    ss["w.ood_bundled"] = [d for d in ss["w.ood_bundled"] if d in bundled]
    st.multiselect(
        "Real OoD datasets (bundled)",
        bundled,
        key="w.ood_bundled",
        format_func=lambda n: data_mod.BUNDLED[n]["title"],
        help="Real images of other classes, same image size as the InD data.",
    )
    with st.expander("Another OoD dataset (file or Hugging Face id)"):
        st.text_input(
            "Path or Hugging Face id",
            key="w.ood_extra",
            placeholder="/path/to/ood.parquet or owner/name",
        )
        c1, c2 = st.columns(2)
        c1.text_input("Config (HF only)", key="w.ood_extra_config")
        c2.text_input("Split", key="w.ood_extra_split")
    for msg in problems.get("scenarios", []):
        st.error(msg, icon=":material/error:")


def evaluation_section(problems: Problems) -> None:
    st.subheader("Evaluation")
    choices = list(dict.fromkeys(form.METRIC_CHOICES + list(ss["w.metrics"])))
    st.multiselect(
        "Metrics",
        choices,
        key="w.metrics",
        help="OoD is the positive class; values in [0, 1], higher is better. "
        "AUC(max_fpr=0.2): partial AUC on FPR <= 0.2, normalised by the window; "
        "TNR(min_tpr=0.95) = 1 - FPR@95TPR.",
    )
    st.text_input(
        "More metrics (optional, ';'-separated)",
        key="w.metric_custom",
        placeholder="e.g. TPR(max_fpr=0.1); AUC(min_fpr=0.05, max_fpr=0.1)",
    )
    c1, c2 = st.columns(2)
    c1.number_input(
        "Bootstrap resamples (0 = no intervals)",
        min_value=0,
        max_value=5000,
        step=100,
        key="w.n_boot",
        help="Percentile bootstrap 95% intervals of every metric (slower with many scores).",
    )
    if note := ss.pop("sweep_boot_note", None):
        c1.caption(note)
    chosen = list(ss["w.scores"])
    ss["w.baseline"] = form.pick_baseline(ss["w.baseline"], chosen, state.default_baseline())
    c2.selectbox(
        "Baseline",
        chosen or ["-"],
        key="w.baseline",
        help="Marked in the metric table; other scores are compared with it.",
    )
    for msg in problems.get("metrics", []):
        st.error(msg, icon=":material/error:")


def execution_section(problems: Problems) -> None:
    """Where the passes run: device, AMP, executor (workers and address for Ray)."""
    st.subheader("Execution")
    opts = form.execution_options(ss)
    c1, c2 = st.columns(2)
    c1.selectbox(
        "Device",
        opts["devices"],
        key="w.exec_device",
        help="auto: CUDA when available, else the CPU (the run records the device it used). "
        "Device and AMP change the numbers slightly, so they are part of the cache key.",
    )
    c2.selectbox(
        "Mixed precision (AMP)",
        opts["amps"],
        key="w.exec_amp",
        help="off: full precision. bf16 works on the CPU and recent GPUs; fp16 needs CUDA.",
    )
    c3, c4, c5 = st.columns([2, 1, 3])
    c3.selectbox(
        "Executor",
        opts["executors"],
        key="w.exec_executor",
        disabled=opts["executor_disabled"],
        help=opts["hint"] or "local: this process; ray: Ray Data actors, one model copy each.",
    )
    ray = ss["w.exec_executor"] == "ray"
    c4.number_input(
        "Workers", min_value=1, max_value=1024, step=1, key="w.exec_workers", disabled=not ray
    )
    c5.text_input(
        "Ray address",
        key="w.exec_address",
        disabled=not ray,
        placeholder="empty: start a local Ray",
        help="An existing Ray cluster's address (e.g. ray://head:10001); empty starts one here.",
    )
    if opts["hint"] and not ray:
        st.caption(opts["hint"])
    for msg in problems.get("execution", []):
        st.error(msg, icon=":material/error:")


def run_section(config: RunConfig | None, problems: Problems) -> None:
    """Run and what it will compute, at the top of the page (visible without scrolling)."""
    c1, c2 = st.columns([1, 4], vertical_alignment="center")
    clicked = c1.button(
        "Run",
        key="run",
        type="primary",
        icon=":material/play_arrow:",
        disabled=config is None,
        width="stretch",
    )
    if config is not None:
        c2.markdown(
            f"{len(config.scores)} score(s) × {len(config.scenarios)} OoD scenario(s) × "
            f"{len(config.metrics)} metric(s) on {ss['w.n_cal']} calibration / "
            f"{ss['w.n_test']} test samples. Unchanged scores come from the cache."
        )
    for msg in problems.get("run", []):
        st.error(msg, icon=":material/error:")
    if problems and not problems.get("run"):
        c2.error("Fix the problems shown below to run.", icon=":material/error:")
    if clicked and config is not None:
        start_run(config)
    elif ss["run_error"]:
        st.error(ss["run_error"], icon=":material/error:")


def start_run(config: RunConfig) -> None:
    """Run ``config`` (progress where the call is drawn), then open Results; an error is said."""
    result = runs.execute_run(config)
    if result is None:
        st.error(ss["run_error"], icon=":material/error:")
    else:
        st.success(f"Done in {result.seconds:.1f} s.")
        layout.go_to(layout.PAGE_RESULTS)


def side_run(config: RunConfig | None) -> None:
    """Run in the sidebar too, so that it stays in reach while the form is scrolled (the same
    Run as the one at the top of the page; its progress bar is drawn in the sidebar)."""
    with st.sidebar:
        st.divider()
        clicked = st.button(
            "Run",
            key="run_side",
            type="primary",
            icon=":material/play_arrow:",
            disabled=config is None,
            width="stretch",
            help="The same Run as at the top of this page.",
        )
        if config is None:
            st.caption("Fix the problems shown on the page to run.")
        elif clicked:
            start_run(config)


def replay_section() -> None:
    """Upload a run config (exported here or written for ``ood-lens run``) and run it as is."""
    with st.expander("Replay a saved run config (TOML)", icon=":material/upload_file:"):
        up = st.file_uploader(
            "Run config",
            type=["toml"],
            key="replay_file",
            help="The config.toml of an export, or one written for `ood-lens run`.",
        )
        if up is None:
            return
        config, error = runs.parse_uploaded_config(up.getvalue())
        if config is None:
            st.error(error, icon=":material/error:")
            return
        st.caption(runs.describe_config(config))
        if st.button("Replay this config", key="replay", icon=":material/replay:"):
            if runs.execute_run(config, restore_settings=True) is None:
                st.error(ss["run_error"], icon=":material/error:")
            else:
                layout.go_to(layout.PAGE_RESULTS)


def body() -> None:
    layout.header(
        "Scores & scenarios",
        "Pick detectors (their parameters and layers), the OoD "
        "scenarios to test against and the metrics; then Run.",
    )
    choices = loaders.current_layer_choices()
    config, problems = form.build_config(ss, choices)
    layout.controls_css()
    with st.container(key="run_bar"):
        run_section(config, problems)
    side_run(config)
    left, right = st.columns([3, 2], gap="large")
    with left:
        layout.guard(lambda: scores_section(choices, problems))
    with right:
        layout.guard(lambda: scenarios_section(problems))
        layout.guard(lambda: evaluation_section(problems))
        layout.guard(lambda: execution_section(problems))
    st.divider()
    replay_section()


layout.guard(body)
