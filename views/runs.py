"""Page "Runs": the saved runs (:mod:`ood_lens_app.run_store`), open / delete, compare two."""

from __future__ import annotations

import streamlit as st

from ood_core import plots
from ood_lens_app import layout, run_store, runs, state

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


def open_delete(ids: list[str], labels: dict[str, str], root: object) -> None:
    c1, c2, c3 = st.columns([4, 1, 1], vertical_alignment="bottom")
    pick = c1.selectbox("Run", ids, key="runs_pick", format_func=labels.get)
    if c2.button("Open", key="runs_open", type="primary", icon=":material/open_in_new:"):
        if runs.restore_run(pick) is None:
            if ss.get("trust_request"):
                st.rerun()  # the trust box naming its repository is drawn above every page
            st.error(ss["run_error"], icon=":material/error:")
        else:
            layout.go_to(layout.PAGE_RESULTS)
    if c3.button("Delete", key="runs_delete", icon=":material/delete:"):
        run_store.delete(root, pick)
        if ss.get("run_id") == pick:
            ss["run_id"] = None
            if "run" in st.query_params:
                del st.query_params["run"]
        st.rerun()


def _sign_colour(value: float) -> str:
    if value != value or abs(value) < 1e-9:  # NaN or equal
        return ""
    return "color: #1b5e20" if value > 0 else "color: #b71c1c"


def compare(ids: list[str], labels: dict[str, str], root: object) -> None:
    st.subheader("Compare two runs")
    c1, c2 = st.columns(2)
    a_id = c1.selectbox(
        "Run A", ids, index=min(1, len(ids) - 1), key="runs_a", format_func=labels.get
    )
    b_id = c2.selectbox("Run B", ids, index=0, key="runs_b", format_func=labels.get)
    a, b = run_store.load(root, a_id), run_store.load(root, b_id)
    st.markdown(f"**A:** {run_store.label(a)}  \n**B:** {run_store.label(b)}")
    diff = run_store.compare(a, b)
    colours = diff[["B - A"]].map(_sign_colour)
    st.dataframe(
        run_store.compare_text(diff).style.apply(lambda _: colours, axis=None, subset=["B - A"]),
        hide_index=True,
        key="runs_diff",
        width="stretch",
    )
    common = run_store.common_scenarios(a, b)
    if not common:
        st.info("The two runs share no OoD scenario: no ROC curves to overlay.")
        return
    ood = st.selectbox("OoD scenario", common, key="runs_ood")
    curves = run_store.roc_inputs({"A": a, "B": b}, ood)
    colors, dashes = run_store.roc_styles(list(curves))
    fig = plots.roc_figure(
        curves, title=f"InD vs {ood}: A solid, B dashed", colors=colors, dashes=dashes
    )
    fig.update_layout(height=480, legend_title_text="run · score")
    st.plotly_chart(fig, key="runs_roc", config={"displaylogo": False})


def body() -> None:
    layout.header(
        "Runs",
        "Every Run is saved with its settings (the URL's ?run= names the one on screen). "
        "Open one to see its results and settings again, or compare two.",
    )
    root = run_store.runs_dir()
    table = run_store.list_runs(root)
    if table.empty:
        st.info(f"No saved runs yet in {root}. Runs are saved here as you make them.")
        return
    st.caption(
        f"{len(table)} run(s) in `{root}`; AUROC = AUC() averaged over scores and scenarios."
    )
    run_list(table)
    ids = list(table["id"])
    labels = {
        r["id"]: f"{r['when']} · {r['model']} · {r['scores']}" for r in table.to_dict("records")
    }
    open_delete(ids, labels, root)
    st.divider()
    layout.guard(lambda: compare(ids, labels, root))


layout.guard(body)
