"""Page 3 - Scores & scenarios: detectors and their parameters, OoD scenarios, metrics, Run."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd
import streamlit as st

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ood_core import data as data_mod  # noqa: E402
from ood_core.perturbations import list_perturbations  # noqa: E402
from ood_core.pipeline import RunConfig  # noqa: E402
from ood_core.scores import get_score_class, list_scores  # noqa: E402
from pages import common  # noqa: E402

common.init_state()
ss = st.session_state

RULE_TEXT = {"none": "uses logits only", "any": "reads any layers",
             "params": "needs layers holding parameters (gradients)"}  # fmt: skip


@st.cache_data(show_spinner=False)
def score_rows() -> list[dict]:
    return list_scores()


def scores_section(problems: dict[str, list[str]]) -> None:
    rows = {r["name"]: r for r in score_rows()}
    st.subheader("Scores")
    ss["w.scores"] = [s for s in ss["w.scores"] if s in rows]
    st.multiselect(
        "Confidence scores", list(rows), key="w.scores",
        help="Each score maps an input to a confidence (higher = more in-distribution). Type to "
             "filter. Families: " + ", ".join(sorted({r['family'] for r in rows.values()})) + ".",
    )  # fmt: skip
    with st.expander("Catalogue: every score, its family, layers and paper",
                     icon=":material/menu_book:"):  # fmt: skip
        st.dataframe(
            pd.DataFrame([{"score": r["name"], "family": r["family"], "layers": r["layers"],
                           "fitted": r["needs_fit"], "gradients": r["gradients"],
                           "paper": r["reference"]} for r in rows.values()]),
            hide_index=True, key="catalogue",
        )  # fmt: skip
    if not ss["w.scores"]:
        st.info("Choose at least one score.")
        return
    table = common.current_layer_table()
    names = dict(zip(table["id"].astype(str), table["name"], strict=True))
    for name in ss["w.scores"]:
        row = rows[name]
        cls = get_score_class(name)
        options = common.sync_score_layers(name, table)
        bad = name in problems
        params, _ = common.param_values(name, row["params"])
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        layers = ss.get(common.score_layer_key(name), []) if cls.layer_rule != "none" else []
        where = ("layers " + ", ".join(layers)) if layers else "logits only"
        title = f"**{name}**{f'({shown})' if shown else ''} · {where} · *{row['family']}*"
        with st.expander(title, expanded=bad, icon=":material/error:" if bad else None):
            doc = re.sub(r":\w+:`", "`", row["doc"])  # drop reST roles such as :func:
            st.caption(f"{doc} ({row['reference']})")
            key = common.score_layer_key(name)
            if cls.layer_rule == "none":
                st.multiselect("Layers", [], key=f"disabled_layers_{name}", disabled=True,
                               placeholder="uses logits only", help="This score reads the logits.")  # fmt: skip
            else:
                st.multiselect(
                    "Layers", options, key=key, max_selections=cls.max_layers,
                    format_func=lambda lid: f"{lid} · {names.get(lid, '')}",
                    help=f"{name} {RULE_TEXT[cls.layer_rule]}"
                         + (f", at most {cls.max_layers}" if cls.max_layers else "")
                         + ". Defaults to the Layers page selection.",
                )  # fmt: skip
                if len(ss.get(key, [])) > 1:
                    st.checkbox("Evaluate each layer separately (layer sweep)",
                                key=f"w.sweep.{name}", help="One score per layer instead of one "
                                "score on all of them; the Results page then shows a layer "
                                "heatmap.")  # fmt: skip
            common.param_widgets(name, row["params"])
            for msg in problems.get(name, []):
                st.error(msg, icon=":material/error:")


def scenarios_section(problems: dict[str, list[str]]) -> None:
    st.subheader("OoD scenarios")
    perts = {r["key"]: r for r in list_perturbations()}
    ss["w.perts"] = [k for k in ss["w.perts"] if k in perts]
    st.multiselect("Perturbations of the InD test images", list(perts), key="w.perts",
                   format_func=lambda k: perts[k]["title"],
                   help="Each builds an OoD set from the InD test samples.")  # fmt: skip
    for kind in ss["w.perts"]:
        row = perts[kind]
        descs = [p.as_dict() for p in row["params"]]
        if descs:
            with st.expander(f"{row['title']}: parameters"):
                st.caption(row["help"])
                common.param_widgets(f"pert:{kind}", descs)
    bundled = [d["name"] for d in data_mod.list_bundled()
               if "test" in d["splits"] and d["name"] != ss["ind_source"]]  # fmt: skip
    ss["w.ood_bundled"] = [d for d in ss["w.ood_bundled"] if d in bundled]
    st.multiselect("Real OoD datasets (bundled)", bundled, key="w.ood_bundled",
                   format_func=lambda n: data_mod.BUNDLED[n]["title"],
                   help="Real images of other classes, same image size as the InD data.")  # fmt: skip
    with st.expander("Another OoD dataset (file or Hugging Face id)"):
        st.text_input("Path or Hugging Face id", key="w.ood_extra",
                      placeholder="/path/to/ood.parquet or owner/name")  # fmt: skip
        c1, c2 = st.columns(2)
        c1.text_input("Config (HF only)", key="w.ood_extra_config")
        c2.text_input("Split", key="w.ood_extra_split")
    for msg in problems.get("scenarios", []):
        st.error(msg, icon=":material/error:")


def evaluation_section(problems: dict[str, list[str]]) -> None:
    st.subheader("Evaluation")
    choices = list(dict.fromkeys(common.METRIC_CHOICES + list(ss["w.metrics"])))
    st.multiselect("Metrics", choices, key="w.metrics",
                   help="OoD is the positive class; values in [0, 1], higher is better. "
                        "AUC(max_fpr=0.2): partial AUC on FPR <= 0.2, normalised by the window; "
                        "TNR(min_tpr=0.95) = 1 - FPR@95TPR.")  # fmt: skip
    st.text_input("More metrics (optional, ';'-separated)", key="w.metric_custom",
                  placeholder="e.g. TPR(max_fpr=0.1); AUC(min_fpr=0.05, max_fpr=0.1)")
    c1, c2 = st.columns(2)
    c1.number_input("Bootstrap resamples (0 = no intervals)", min_value=0, max_value=5000,
                    step=100, key="w.n_boot", help="Percentile bootstrap 95% intervals of every "
                    "metric (slower with many scores).")  # fmt: skip
    chosen = list(ss["w.scores"])
    if ss["w.baseline"] not in chosen:
        ss["w.baseline"] = ("Softmax" if "Softmax" in chosen else chosen[0]) if chosen else "-"
    c2.selectbox("Baseline", chosen or ["-"], key="w.baseline",
                 help="Marked in the metric table; other scores are compared with it.")
    for msg in problems.get("metrics", []):
        st.error(msg, icon=":material/error:")


def run_section(config: RunConfig | None, problems: dict[str, list[str]]) -> None:
    n_specs = len(config.scores) if config else 0
    n_sc = len(config.scenarios) if config else 0
    c1, c2 = st.columns([1, 3])
    clicked = c1.button("Run", key="run", type="primary", icon=":material/play_arrow:",
                        disabled=config is None, width="stretch")  # fmt: skip
    if config is not None:
        c2.markdown(f"{n_specs} score(s) × {n_sc} OoD scenario(s) × {len(config.metrics)} "
                    f"metric(s) on {ss['w.n_cal']} calibration / {ss['w.n_test']} test samples. "
                    "Unchanged scores come from the cache.")  # fmt: skip
    for msg in problems.get("run", []):
        st.error(msg, icon=":material/error:")
    if problems and not problems.get("run"):
        c2.error("Fix the problems shown above to run.", icon=":material/error:")
    if clicked and config is not None:
        result = common.execute_run(config)
        if result is None:
            st.error(ss["run_error"], icon=":material/error:")
        else:
            st.success(f"Done in {result.seconds:.1f} s.")
            common.go_to(common.PAGE_RESULTS, "Results")
    elif ss["run_error"]:
        st.error(ss["run_error"], icon=":material/error:")


def body() -> None:
    common.header("Scores & scenarios", "Pick detectors (their parameters and layers), the OoD "
                  "scenarios to test against and the metrics; then Run.")  # fmt: skip
    config, problems = common.build_config()
    left, right = st.columns([3, 2], gap="large")
    with left:
        common.guard(lambda: scores_section(problems))
    with right:
        common.guard(lambda: scenarios_section(problems))
        common.guard(lambda: evaluation_section(problems))
    st.divider()
    run_section(config, problems)
    common.replay_section()


common.guard(body)
