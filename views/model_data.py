"""Page "Model & data": the classifier, the in-distribution data, sizes, preview, accuracy."""

from __future__ import annotations

import streamlit as st

from ood_core import data as data_mod
from ood_core import hub, plots
from ood_core.core import output_text
from ood_lens_app import layers, layout, loaders, result_views, runs, sources, state
from ood_lens_app.state import DATA_SOURCES, MODEL_SOURCES, SEED, trust_key

state.init_state()
ss = st.session_state


# ---------------------------------------------------------------------------- actions
def _picks() -> list[str]:
    return layers.default_selection(loaders.current_layer_choices())


def _on_load_model() -> None:
    sources.apply_model(ss, *sources.model_request(ss), loaders.load_model, _picks)


def _on_output() -> None:
    sources.apply_output(ss, ss["w.model_output"])


def _on_load_data() -> None:
    sources.apply_data(ss, *sources.data_request(ss), loaders.load_dataset, _picks)


# ---------------------------------------------------------------------------- sections
def _trust_box(repo: str) -> None:
    """The consent checkbox of a non-bundled repo, unchecked until ticked for this very repo."""
    repo = repo.strip()
    if repo:
        shown = repo.replace("`", "")
        st.checkbox(
            f"I trust `{shown}`: loading it runs its code (hubconf.py and the model) on "
            "this machine",
            key=trust_key(repo),
            help="Only the bundled models are trusted without asking. Tick this only "
            "for a repository whose code you would run yourself.",
        )


def _hub_inputs(repo_key: str, repo_label: str, entry_key: str, **repo_kwargs: str) -> None:
    c1, c2 = st.columns([3, 2])
    c1.text_input(repo_label, key=repo_key, **repo_kwargs)
    c2.text_input("Entry point", key=entry_key, placeholder=f"e.g. {ss['model_entry']}")
    _trust_box(ss[repo_key])
    st.button("Load model", key="load_model", on_click=_on_load_model, type="primary")


def _bundled_model() -> None:
    entries = {e["name"]: e for e in loaders.bundled_entries()}
    if ss["w.bundled_entry"] not in entries and entries:
        ss["w.bundled_entry"] = next(iter(entries))

    st.selectbox(
        "Bundled model",
        list(entries),
        key="w.bundled_entry",
        on_change=_on_load_model,
    )
    if doc := entries.get(ss["w.bundled_entry"], {}).get("doc"):
        st.caption(doc)
    if (ss["model_repo"], ss["model_entry"]) != ("bundled", ss["w.bundled_entry"]):
        st.button("Use this model", key="load_model", on_click=_on_load_model)


def model_section() -> None:
    st.subheader("Model")
    src = st.radio(
        "Source",
        MODEL_SOURCES,
        key="w.model_src",
        horizontal=True,
        help="A torch.hub entry point: the bundled models, any GitHub torch.hub "
        "repository (needs network) or a local folder with a hubconf.py.",
    )
    if src == MODEL_SOURCES[0]:
        _bundled_model()
    elif off := loaders.source_policy().refusal(
        "github" if src == MODEL_SOURCES[1] else "local_hub"
    ):
        st.info(off, icon=":material/lock:")
    elif src == MODEL_SOURCES[1]:
        _hub_inputs(
            "w.gh_repo",
            "Repository",
            "w.gh_entry",
            placeholder="owner/repo or owner/repo:ref",
            help="A GitHub repository with a hubconf.py, loaded with torch.hub.",
        )
    else:
        _hub_inputs(
            "w.local_dir",
            "Hub directory",
            "w.local_entry",
            placeholder="/path/to/folder/with/hubconf.py",
        )
    if ss["model_error"]:
        st.error(ss["model_error"], icon=":material/error:")
    st.text_input(
        "Output (index or key)",
        key="w.model_output",
        on_change=_on_output,
        placeholder="empty: the model returns the logits",
        help="For a model that returns a tuple, list or dict (or an object such as a Hugging "
        "Face ModelOutput): the element holding the logits, e.g. 0 for (logits, features) or "
        "logits for {'logits': ...}. Empty: the whole output. Layer ids do not change.",
    )
    if ss["output_error"]:
        st.error(ss["output_error"], icon=":material/error:")
    net = loaders.model_for_run()
    info = hub.model_info(net, ss["model_entry"])
    n_params = sum(p.numel() for p in net.parameters())
    where = "bundled hub" if ss["model_repo"] == "bundled" else ss["model_repo"]
    lines = [
        f"**Current model:** `{ss['model_entry']}` from {where} · {type(net).__name__}, "
        f"{n_params:,} parameters"
    ]
    if ss["model_output"] is not None:
        lines.append(
            f"logits read from output `{output_text(ss['model_output']).replace('`', '')}`"
        )
    if info.input_shape:
        lines.append(f"expects inputs {tuple(info.input_shape)} (C, H, W)")
    st.markdown("  \n".join(lines))


def _local_file_inputs() -> None:
    policy = loaders.source_policy()
    if off := policy.refusal("local_files"):
        st.info(off, icon=":material/lock:")
        return
    if roots := policy.load_roots():
        st.caption(f"Served on a network: paths must lie under {', '.join(roots)}.")
    st.text_input(
        "File or folder",
        key="w.data_path",
        placeholder="/path/to/data.parquet, data.npz or an image folder",
        help="A .parquet (image + label columns), a .npz (images, labels) or a folder "
        "of class sub-folders. Calibration and test subsets are drawn from it.",
    )
    st.button("Load dataset", key="load_data", on_click=_on_load_data, type="primary")


def _sizes() -> None:
    calib, test = loaders.dataset("cal_split"), loaders.dataset("test_split")
    shared = ss["cal_split"] == ss["test_split"] or data_mod.is_single_source(ss["ind_source"])
    ss["w.n_cal"], ss["w.n_test"] = sources.fit_sizes(
        ss["w.n_cal"], ss["w.n_test"], len(calib), len(test), shared
    )
    c1, c2 = st.columns(2)
    c1.number_input(
        f"Calibration samples (of {len(calib):,})",
        min_value=1,
        max_value=len(calib),
        step=100,
        key="w.n_cal",
        help="Fit the scores on this many samples of the "
        f"'{ss['cal_split']}' split (drawn with seed {SEED}).",
    )
    c2.number_input(
        f"Test samples (of {len(test):,})",
        min_value=1,
        max_value=len(test),
        step=100,
        key="w.n_test",
        help=f"Score this many samples of the '{ss['test_split']}' "
        "split; perturbation scenarios are built from them.",
    )
    title = data_mod.BUNDLED.get(ss["ind_source"], {}).get("title", ss["ind_source"])
    st.markdown(
        f"**Current data:** {title} · images {tuple(calib.sample_shape)} · "
        f"{len(calib.class_names)} classes · splits '{ss['cal_split']}' / '{ss['test_split']}'"
    )
    if ss["cal_split"] == ss["test_split"]:
        st.info(
            "Calibration and test samples come from the same data: a run draws them as "
            "disjoint subsets (their sizes must add up to at most the data size).",
            icon=":material/info:",
        )


def data_section() -> None:
    st.subheader("In-distribution data")
    src = st.radio(
        "Source",
        DATA_SOURCES,
        key="w.data_src",
        horizontal=True,
        help="The data the model was trained on (InD). Calibration samples fit the "
        "scores; test samples are scored against the OoD scenarios.",
    )
    if src == DATA_SOURCES[0]:
        bundled = {d["name"]: d for d in data_mod.list_bundled()}
        st.selectbox(
            "Bundled dataset",
            list(bundled),
            key="w.bundled_data",
            format_func=lambda n: bundled[n]["title"],
        )
        st.caption(bundled[ss["w.bundled_data"]]["help"])
        if ss["ind_source"] != ss["w.bundled_data"]:
            st.button("Use this dataset", key="load_data", on_click=_on_load_data, type="primary")
    elif src == DATA_SOURCES[1]:
        _local_file_inputs()
    else:
        c1, c2 = st.columns([3, 2])
        c1.text_input("Hugging Face dataset id", key="w.hf_id", placeholder="owner/name")
        c2.text_input("Config (optional)", key="w.hf_config")
        c3, c4 = st.columns(2)
        c3.text_input("Calibration split", key="w.hf_cal_split")
        c4.text_input("Test split", key="w.hf_test_split")
        st.button("Load dataset", key="load_data", on_click=_on_load_data, type="primary")
    if ss["data_error"]:
        st.error(ss["data_error"], icon=":material/error:")
    _sizes()


def check_and_preview() -> None:
    net = loaders.model_for_run()
    test = loaders.dataset("test_split")
    try:
        hub.check_compatible(
            net, test.sample_shape, len(test.class_names), name=f"Model '{ss['model_entry']}'"
        )
    except ValueError as exc:
        st.error(f"{exc}", icon=":material/error:")
        return
    n_test = int(ss["w.n_test"])
    pred = loaders.test_predictions(
        ss["model_repo"],
        ss["model_entry"],
        ss["ind_source"],
        ss["test_split"],
        ss["ind_config"],
        n_test,
        SEED + 1,
        ss["model_output"],
    )
    subset = test.subset(n_test, SEED + 1)
    acc = float((pred == subset.labels.numpy()).mean())
    c1, c2 = st.columns([1, 4])
    title = data_mod.BUNDLED.get(ss["ind_source"], {}).get("title", ss["ind_source"])
    c1.metric(
        "Test accuracy",
        f"{acc:.1%}",
        help="The model's accuracy on the test samples a run scores (the InD test set).",
    )
    c1.caption(f"on the {n_test:,} {title} test samples a run scores")
    k = min(16, len(subset))
    captions = result_views.prediction_captions(
        subset.labels[:k].tolist(), pred[:k].tolist(), test.class_names
    )
    fig = plots.image_grid_figure(
        subset.images[:k],
        captions,
        n_cols=8,
        title="Test samples (true class → prediction when wrong)",
    )
    c2.plotly_chart(fig, key="preview", config={"displayModeBar": False})


QUESTION = (
    "**Which confidence score, on which layers, best tells the inputs this classifier was "
    "trained for (in-distribution, InD) from everything else (out-of-distribution, OoD)?**"
)


def intro() -> None:
    """The question the app answers and the one-click demo."""
    with st.container(border=True):
        c1, c2 = st.columns([4, 1], vertical_alignment="center")
        c1.markdown(QUESTION)
        cfg = runs.demo_config()
        c1.caption(
            "Set up a model, its data, layers, scores and OoD scenarios on these pages, or run "
            f"the bundled demo: {runs.describe_config(cfg)}."
        )
        if c2.button(
            "Run the demo",
            key="run_demo",
            type="primary",
            icon=":material/play_arrow:",
            width="stretch",
        ):
            if runs.execute_run(cfg, restore_settings=True) is None:
                st.error(ss["run_error"], icon=":material/error:")
                return
            layout.go_to(layout.PAGE_RESULTS)


def body() -> None:
    layout.header(
        "Model & data",
        "Choose the classifier and its in-distribution data; the "
        "preview shows test samples and the model's accuracy on them.",
    )
    intro()
    if note := loaders.source_policy().describe():
        st.caption(f":material/lan: {note}")
    left, right = st.columns(2, gap="large")
    with left:
        layout.guard(model_section)
    with right:
        layout.guard(data_section)
    st.divider()
    check_and_preview()
    layout.next_link(layout.PAGE_LAYERS, "Next: choose layers")


layout.guard(body)
