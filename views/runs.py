"""Page "Runs": the saved runs (:mod:`ood_lens_app.run_store`), open / delete, compare two;
runs computed elsewhere (a run store or bundle folder by path, read-only:
:mod:`ood_lens_app.run_folders`); where and how each run was computed."""

from __future__ import annotations

import streamlit as st

from ood_core import plots
from ood_lens_app import compare, layout, loaders, run_folders, run_store, runs, state

state.init_state()
ss = st.session_state


def run_list(table: object) -> None:
    st.dataframe(
        table,
        hide_index=True,
        key="runs_table",
        width="stretch",
        column_config={"AUROC (mean)": st.column_config.NumberColumn(format="%.3f")},
    )


def open_delete(
    ids: list[str],
    labels: dict[str, str],
    root: object,
    folder: run_folders.RunFolder | None = None,
) -> str:
    """The run picker, Open and (for this dashboard's own store only) Delete; the run picked."""
    c1, c2, c3 = st.columns([4, 1, 1], vertical_alignment="bottom")
    pick = c1.selectbox("Run", ids, key="runs_pick", format_func=labels.get)
    if c2.button("Open", key="runs_open", type="primary", icon=":material/open_in_new:"):
        if runs.restore_run(pick, folder=folder) is None:
            if ss.get("trust_request"):
                st.rerun()  # the trust box naming its repository is drawn above every page
            st.error(ss["run_error"], icon=":material/error:")
        else:
            layout.go_to(layout.PAGE_RESULTS)
    if folder is not None:  # runs computed elsewhere are read-only
        return pick
    name_field(root, pick)
    if c3.button("Delete", key="runs_delete", icon=":material/delete:"):
        ss["runs_confirm"] = pick
    asking = ss.get("runs_confirm")
    if asking == pick:
        with st.container(border=True):
            st.warning(
                f"Delete the run of {labels.get(pick, pick)}? You can undo it until you "
                "delete another run.",
                icon=":material/delete:",
            )
            y, n, _ = st.columns([1, 1, 4])
            if y.button("Delete", key="runs_delete_yes", type="primary"):
                _delete(root, pick)
                st.rerun()
            if n.button("Cancel", key="runs_delete_no"):
                ss.pop("runs_confirm", None)
                st.rerun()
    elif asking is not None:  # another run was picked meanwhile: nothing is deleted
        ss.pop("runs_confirm", None)
    return pick


def name_field(root: object, pick: str) -> None:
    """The picked run's name (saved as typed, on Enter or leaving the field)."""
    if ss.get("runs_name_for") != pick:  # another run picked: its own name in the field
        ss["runs_name"] = run_store.run_names(root).get(pick, "")
        ss["runs_name_for"] = pick

    def save() -> None:
        try:
            ss["runs_name"] = run_store.set_name(root, pick, ss.get("runs_name", ""))
        except OSError as exc:
            ss["runs_name_error"] = f"The name was not saved: {exc}"

    st.text_input(
        "Name",
        key="runs_name",
        on_change=save,
        max_chars=run_store.MAX_NAME,
        placeholder="e.g. baseline for the review, k=50 trial",
        help="A name for this run, shown in the list and the pickers (kept beside the runs, "
        "the bundle itself is unchanged).",
    )
    if problem := ss.pop("runs_name_error", None):
        st.error(problem, icon=":material/error:")


def _delete(root: object, run_id: str) -> None:
    """Move ``run_id`` to the store's trash (undoable), forgetting the one undoable before."""
    run_store.empty_trash(root)
    run_store.trash(root, run_id)
    ss.pop("runs_confirm", None)
    ss["runs_undo"] = run_id
    if ss.get("run_id") == run_id:
        ss["run_id"] = None
        if "run" in st.query_params:
            del st.query_params["run"]


def undo_bar(root: object) -> None:
    """ "Deleted ...: Undo" for the run deleted last (this dashboard's own store)."""
    gone = ss.get("runs_undo")
    if not gone:
        return
    c1, c2 = st.columns([5, 1], vertical_alignment="center")
    c1.success(f"Deleted run {gone}.", icon=":material/delete:")
    if c2.button("Undo", key="runs_undo_btn", icon=":material/undo:"):
        if not run_store.restore(root, gone):
            st.error(f"Run {gone} can no longer be restored.", icon=":material/error:")
        ss.pop("runs_undo", None)
        st.rerun()


def provenance(run: run_store.StoredRun) -> None:
    """Where and how the picked run was computed (executor, workers, device, versions, host)."""
    with st.expander(f"Computed with: {run_store.computed_text(run.info)}"):
        st.dataframe(
            run_store.provenance_frame(run.info),
            hide_index=True,
            key="runs_provenance",
            width="stretch",
        )


def elsewhere() -> run_folders.RunFolder | None:
    """Open a run store or an exported bundle folder by path (``runs_folder`` in session
    state); the folder shown, or None for this dashboard's own store."""
    shown = ss.get("runs_folder")
    with st.expander(
        "Runs computed elsewhere (a run store or bundle folder)",
        expanded=shown is not None or bool(ss.get("runs_folder_error")),
        icon=":material/folder_open:",
    ):
        c1, c2 = st.columns([5, 1], vertical_alignment="bottom")
        c1.text_input(
            "Folder",
            key="runs_folder_path",
            placeholder="/shared/ood-lens/runs or the --out folder of `ood-lens run`",
            help="Any run store (e.g. on a shared filesystem, written by another machine) or "
            "exported bundle; listed read-only. A run whose model repository is not bundled "
            "still asks for its trust box.",
        )
        if c2.button("Open folder", key="runs_folder_open", icon=":material/folder_open:"):
            _forget_picks()
            try:
                ss["runs_folder"] = run_folders.check_folder(
                    ss.get("runs_folder_path", ""), loaders.source_policy()
                )
                ss["runs_folder_error"] = None
            except ValueError as exc:  # FolderError, SourceNotAllowedError
                ss["runs_folder_error"] = str(exc)
            shown = ss.get("runs_folder")
        if ss.get("runs_folder_error"):
            st.error(ss["runs_folder_error"], icon=":material/error:")
        if shown is not None and st.button(
            "Back to this dashboard's runs", key="runs_folder_back", icon=":material/undo:"
        ):
            ss["runs_folder"], shown = None, None
            _forget_picks()
    return shown


def _forget_picks() -> None:
    """The run pickers name runs of the folder shown: forgotten when it changes."""
    for key in ("runs_pick", "runs_a", "runs_b", "runs_ood", "runs_name_for"):
        ss.pop(key, None)


def _sign_colour(value: float) -> str:
    if value != value or abs(value) < 1e-9:  # NaN or equal
        return ""
    return "color: #1b5e20" if value > 0 else "color: #b71c1c"


def compare_runs(
    ids: list[str],
    labels: dict[str, str],
    root: object,
    folder: run_folders.RunFolder | None = None,
) -> None:
    st.subheader("Compare two runs")
    c1, c2 = st.columns(2)
    a_id = c1.selectbox(
        "Run A", ids, index=min(1, len(ids) - 1), key="runs_a", format_func=labels.get
    )
    b_id = c2.selectbox("Run B", ids, index=0, key="runs_b", format_func=labels.get)
    if folder is None:
        a, b = run_store.load(root, a_id), run_store.load(root, b_id)
    else:
        a, b = run_folders.load_run(folder, a_id), run_folders.load_run(folder, b_id)
    st.markdown(f"**A:** {run_store.label(a)}  \n**B:** {run_store.label(b)}")
    changes = compare.config_changes(a.config, b.config)
    if changes:
        st.markdown("**What changed from A to B**\n" + "\n".join(f"- `{line}`" for line in changes))
    else:
        st.caption("The two runs have the same settings.")
    diff = compare.compare(a.metrics, b.metrics)
    only = st.toggle(
        "Changed only",
        key="runs_changed_only",
        help="Only the rows whose score setting differs, that one run lacks, or whose value moved",
    )
    shown = diff[diff["changed"]] if only else diff
    colours = shown[["B - A"]].map(_sign_colour)
    st.dataframe(
        compare.compare_text(shown).style.apply(lambda _: colours, axis=None, subset=["B - A"]),
        hide_index=True,
        key="runs_diff",
        width="stretch",
        column_config={
            "score": st.column_config.TextColumn(
                "score", help="A score is paired across runs by its class, layers and position"
            ),
            "setting": st.column_config.TextColumn(
                "setting", help="The score as each run names it (A → B when it changed)"
            ),
        },
    )
    common = compare.common_scenarios(a.confidences, b.confidences)
    if not common:
        st.info("The two runs share no OoD scenario: no ROC curves to overlay.")
        return
    ood = st.selectbox("OoD scenario", common, key="runs_ood")
    curves, ids = compare.roc_inputs({"A": a.confidences, "B": b.confidences}, ood)
    colors, dashes = compare.roc_styles(ids)
    fig = plots.roc_figure(
        curves, title=f"InD vs {ood}: A solid, B dashed", colors=colors, dashes=dashes
    )
    fig.update_layout(height=480, legend_title_text="run · score")
    st.plotly_chart(fig, key="runs_roc", config={"displaylogo": False})


def body() -> None:
    layout.header(
        "Runs",
        "Every Run is saved with its settings (the URL's ?run= names the one on screen). "
        "Open one to see its results and settings again, or compare two; open runs computed "
        "elsewhere from their folder.",
    )
    folder = elsewhere()
    root = run_store.runs_dir() if folder is None else folder.path
    if folder is None:
        table = run_store.list_runs(root)
    else:
        try:
            table = run_folders.list_folder(folder)
        except (OSError, ValueError) as exc:
            st.error(f"Cannot list {folder.path}: {exc}", icon=":material/error:")
            return
    if folder is None:
        undo_bar(root)
    if table.empty:
        st.info(f"No saved runs yet in {root}. Runs are saved here as you make them.")
        return
    what = "bundle" if folder is not None and folder.kind == "bundle" else "run(s)"
    st.caption(
        f"{len(table)} {what} in `{root}`"
        + (" (computed elsewhere, read-only)" if folder is not None else "")
        + "; AUROC = AUC() averaged over scores and scenarios."
    )
    run_list(table)
    ids = list(table["id"])
    labels = {
        r["id"]: (f"{r['name']} · " if r.get("name") else "")
        + f"{r['when']} · {r['model']} · {r['scores']}"
        for r in table.to_dict("records")
    }
    pick = open_delete(ids, labels, root, folder)
    layout.guard(
        lambda: provenance(
            run_store.load(root, pick, confidences=False)
            if folder is None
            else run_folders.load_run(folder, pick)
        )
    )
    if folder is not None and folder.kind == "bundle":
        return  # one run: nothing to compare
    st.divider()
    layout.guard(lambda: compare_runs(ids, labels, root, folder))


layout.guard(body)
