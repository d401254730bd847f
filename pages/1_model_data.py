"""Page 1 - Model & data: the classifier, the in-distribution data, sizes, preview, accuracy."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ood_core import data as data_mod  # noqa: E402
from ood_core import hub, plots  # noqa: E402
from pages import common  # noqa: E402

common.init_state()
ss = st.session_state


# ---------------------------------------------------------------------------- actions
def _trust_key(repo: str) -> str:
    return f"w.trust.{repo.strip()}"


def _apply_model(repo: str, entry: str, trust: bool | None = None) -> None:
    """Load ``entry`` from ``repo``; on success make it current, else keep the error message.
    ``trust``: the trust checkbox of a non-bundled repo (None for the bundled one)."""
    repo, entry = repo.strip(), entry.strip()
    if not repo or not entry:
        ss["model_error"] = "Give both a repository and an entry point."
        return
    try:
        common.load_model(repo, entry, trust_repo=trust)
    except Exception as exc:  # noqa: BLE001 - callbacks must never raise into the page
        ss["model_error"] = str(exc) if isinstance(exc, common.EXPECTED_ERRORS) else (
            f"Could not load '{entry}' from '{repo}': {type(exc).__name__}: {exc}")
        return
    ss["model_error"] = None
    if trust:
        ss["trusted_repos"] = list(dict.fromkeys([*ss.get("trusted_repos", []), repo]))
    if (repo, entry) != (ss["model_repo"], ss["model_entry"]):
        ss["model_repo"], ss["model_entry"] = repo, entry
        _reset_layers()


def _reset_layers() -> None:
    """New model or data: default the layer selection to this network's own quick picks."""
    ss["layers_version"] += 1
    try:
        table = common.current_layer_table()
    except Exception:  # noqa: BLE001 - incompatible model/data: the page shows why
        ss["layers"] = []
        return
    from ood_core import explore

    ids = set(table["id"])
    if all(lid in ids for lid in common.DEFAULT_LAYERS) and ss["model_entry"] == "tiniest":
        ss["layers"] = list(common.DEFAULT_LAYERS)
    else:
        picks = explore.layer_quick_picks(table)
        ss["layers"] = picks["pooled"] + picks["logits"]


def _on_bundled_entry() -> None:
    _apply_model("bundled", ss["w.bundled_entry"])


def _on_load_model() -> None:
    src = ss["w.model_src"]
    if src == common.MODEL_SOURCES[0]:
        _apply_model("bundled", ss["w.bundled_entry"])
    else:
        repo_key, entry_key = (("w.gh_repo", "w.gh_entry") if src == common.MODEL_SOURCES[1]
                               else ("w.local_dir", "w.local_entry"))  # fmt: skip
        repo = ss[repo_key]
        _apply_model(repo, ss[entry_key], bool(ss.get(_trust_key(repo), False)))


def _apply_data(source: str, cal_split: str, test_split: str, config: str | None) -> None:
    source = source.strip()
    if not source:
        ss["data_error"] = "Give a dataset (a file path or a Hugging Face id)."
        return
    try:
        for split in dict.fromkeys((cal_split, test_split)):
            common.load_dataset(source, split, config)
    except Exception as exc:  # noqa: BLE001 - callbacks must never raise into the page
        ss["data_error"] = str(exc) if isinstance(exc, common.EXPECTED_ERRORS) else (
            f"Could not load '{source}': {type(exc).__name__}: {exc}")
        return
    ss["data_error"] = None
    new = (source, config, cal_split, test_split)
    if new != (ss["ind_source"], ss["ind_config"], ss["cal_split"], ss["test_split"]):
        ss["ind_source"], ss["ind_config"], ss["cal_split"], ss["test_split"] = new
        _reset_layers()


def _on_load_data() -> None:
    src = ss["w.data_src"]
    if src == common.DATA_SOURCES[0]:
        name = ss["w.bundled_data"]
        splits = data_mod.BUNDLED[name]["splits"]
        cal = "calibration" if "calibration" in splits else next(iter(splits))
        test = "test" if "test" in splits else next(iter(splits))
        _apply_data(name, cal, test, None)
    elif src == common.DATA_SOURCES[1]:
        path = ss["w.data_path"].strip()
        _apply_data(path, "test", "test", None)
    else:
        _apply_data(ss["w.hf_id"], ss["w.hf_cal_split"].strip() or "train",
                    ss["w.hf_test_split"].strip() or "test", ss["w.hf_config"].strip() or None)  # fmt: skip


# ---------------------------------------------------------------------------- sections
def _trust_box(repo: str) -> None:
    """The consent checkbox of a non-bundled repo, unchecked until ticked for this very repo."""
    repo = repo.strip()
    if repo:
        shown = repo.replace("`", "")
        st.checkbox(f"I trust `{shown}`: loading it runs its code (hubconf.py and the model) on "
                    "this machine", key=_trust_key(repo),
                    help="Only the bundled models are trusted without asking. Tick this only "
                         "for a repository whose code you would run yourself.")  # fmt: skip


def model_section() -> None:
    st.subheader("Model")
    src = st.radio("Source", common.MODEL_SOURCES, key="w.model_src", horizontal=True,
                   help="A torch.hub entry point: the bundled models, any GitHub torch.hub "
                        "repository (needs network) or a local folder with a hubconf.py.")  # fmt: skip
    if src == common.MODEL_SOURCES[0]:
        entries = common.bundled_entries()
        names = [e["name"] for e in entries]
        by_name = {e["name"]: e for e in entries}
        if ss["w.bundled_entry"] not in names and names:
            ss["w.bundled_entry"] = names[0]

        def label(name: str) -> str:
            e = by_name[name]
            acc = f" · test accuracy {e['accuracy']:.1%}" if e.get("accuracy") is not None else ""
            return f"{name}{acc}"

        st.selectbox("Bundled model", names, key="w.bundled_entry", format_func=label,
                     on_change=_on_bundled_entry)  # fmt: skip
        doc = by_name.get(ss["w.bundled_entry"], {}).get("doc")
        if doc:
            st.caption(doc)
        if (ss["model_repo"], ss["model_entry"]) != ("bundled", ss["w.bundled_entry"]):
            st.button("Use this model", key="load_model", on_click=_on_load_model)
    elif (off := common.source_policy().refusal(
            "github" if src == common.MODEL_SOURCES[1] else "local_hub")):
        st.info(off, icon=":material/lock:")
    elif src == common.MODEL_SOURCES[1]:
        c1, c2 = st.columns([3, 2])
        c1.text_input("Repository", key="w.gh_repo", placeholder="owner/repo or owner/repo:ref",
                      help="A GitHub repository with a hubconf.py, loaded with torch.hub.")  # fmt: skip
        c2.text_input("Entry point", key="w.gh_entry", placeholder="e.g. tiniest")
        _trust_box(ss["w.gh_repo"])
        st.button("Load model", key="load_model", on_click=_on_load_model, type="primary")
    else:
        c1, c2 = st.columns([3, 2])
        c1.text_input("Hub directory", key="w.local_dir", placeholder="/path/to/folder/with/hubconf.py")
        c2.text_input("Entry point", key="w.local_entry", placeholder="e.g. tiniest")
        _trust_box(ss["w.local_dir"])
        st.button("Load model", key="load_model", on_click=_on_load_model, type="primary")
    if ss["model_error"]:
        st.error(ss["model_error"], icon=":material/error:")
    net = common.model_for_run()
    info = hub.model_info(net, ss["model_entry"])
    n_params = sum(p.numel() for p in net.parameters())
    where = "bundled hub" if ss["model_repo"] == "bundled" else ss["model_repo"]
    lines = [f"**Current model:** `{ss['model_entry']}` from {where} · {type(net).__name__}, "
             f"{n_params:,} parameters"]  # fmt: skip
    if info.input_shape:
        lines.append(f"expects inputs {tuple(info.input_shape)} (C, H, W)")
    if info.test_accuracy is not None:
        lines.append(f"recorded test accuracy {info.test_accuracy:.2%}")
    st.markdown("  \n".join(lines))


def _local_file_inputs() -> None:
    policy = common.source_policy()
    if off := policy.refusal("local_files"):
        st.info(off, icon=":material/lock:")
        return
    if roots := policy.load_roots():
        st.caption(f"Served on a network: paths must lie under {', '.join(roots)}.")
    st.text_input("File or folder", key="w.data_path",
                  placeholder="/path/to/data.parquet, data.npz or an image folder",
                  help="A .parquet (image + label columns), a .npz (images, labels) or a folder "
                       "of class sub-folders. Calibration and test subsets are drawn from it.")  # fmt: skip
    st.button("Load dataset", key="load_data", on_click=_on_load_data, type="primary")


def data_section() -> None:
    st.subheader("In-distribution data")
    src = st.radio("Source", common.DATA_SOURCES, key="w.data_src", horizontal=True,
                   help="The data the model was trained on (InD). Calibration samples fit the "
                        "scores; test samples are scored against the OoD scenarios.")  # fmt: skip
    if src == common.DATA_SOURCES[0]:
        names = [d["name"] for d in data_mod.list_bundled()]
        titles = {d["name"]: d["title"] for d in data_mod.list_bundled()}
        st.selectbox("Bundled dataset", names, key="w.bundled_data", format_func=titles.get)
        st.caption(data_mod.BUNDLED[ss["w.bundled_data"]]["help"])
        if ss["ind_source"] != ss["w.bundled_data"]:
            st.button("Use this dataset", key="load_data", on_click=_on_load_data, type="primary")
    elif src == common.DATA_SOURCES[1]:
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
    calib, test = common.dataset("cal_split"), common.dataset("test_split")
    same = (ss["cal_split"] == ss["test_split"])
    c1, c2 = st.columns(2)
    ss["w.n_cal"] = max(1, min(int(ss["w.n_cal"]), len(calib)))
    ss["w.n_test"] = max(1, min(int(ss["w.n_test"]), len(test)))
    c1.number_input(f"Calibration samples (of {len(calib):,})", min_value=1, max_value=len(calib),
                    step=100, key="w.n_cal", help="Fit the scores on this many samples of the "
                    f"'{ss['cal_split']}' split (drawn with seed {common.SEED}).")  # fmt: skip
    c2.number_input(f"Test samples (of {len(test):,})", min_value=1, max_value=len(test), step=100,
                    key="w.n_test", help=f"Score this many samples of the '{ss['test_split']}' "
                    "split; perturbation scenarios are built from them.")  # fmt: skip
    title = data_mod.BUNDLED.get(ss["ind_source"], {}).get("title", ss["ind_source"])
    st.markdown(f"**Current data:** {title} · images {tuple(calib.sample_shape)} · "
                f"{len(calib.class_names)} classes · splits '{ss['cal_split']}' / '{ss['test_split']}'")
    if same:
        st.info("Calibration and test samples come from the same data: a run draws them as "
                "disjoint subsets (their sizes must add up to at most the data size).",
                icon=":material/info:")  # fmt: skip


def check_and_preview() -> None:
    net = common.model_for_run()
    test = common.dataset("test_split")
    try:
        hub.check_compatible(net, test.sample_shape, len(test.class_names),
                             name=f"Model '{ss['model_entry']}'")  # fmt: skip
    except ValueError as exc:
        st.error(f"{exc}", icon=":material/error:")
        return
    n_test = int(ss["w.n_test"])
    pred = common.test_predictions(ss["model_repo"], ss["model_entry"], ss["ind_source"],
                                   ss["test_split"], ss["ind_config"], n_test, common.SEED + 1)  # fmt: skip
    subset = test.subset(n_test, common.SEED + 1)
    acc = float((pred == subset.labels.numpy()).mean())
    c1, c2 = st.columns([1, 4])
    c1.metric("Test accuracy", f"{acc:.2%}", help=f"On the {n_test} test samples the run scores")
    names = test.class_names
    k = min(16, len(subset))
    captions = []
    for i in range(k):
        true, guess = int(subset.labels[i]), int(pred[i])
        text = names[true] if true < len(names) else str(true)
        if guess != true:
            text += f" → {names[guess] if guess < len(names) else guess}"
        captions.append(text)
    fig = plots.image_grid_figure(subset.images[:k], captions, n_cols=8,
                                  title="Test samples (true class → prediction when wrong)")  # fmt: skip
    c2.plotly_chart(fig, key="preview", config={"displayModeBar": False})


def body() -> None:
    common.header("Model & data", "Choose the classifier and its in-distribution data; the "
                  "preview shows test samples and the model's accuracy on them.")  # fmt: skip
    if note := common.source_policy().describe():
        st.caption(f":material/lan: {note}")
    left, right = st.columns(2, gap="large")
    with left:
        common.guard(model_section)
    with right:
        common.guard(data_section)
    st.divider()
    check_and_preview()
    common.next_link(common.PAGE_LAYERS, "Next: choose layers")


common.guard(body)
