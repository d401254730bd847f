"""Page registry and shared layout: the error guard, page header, links between pages, the
sidebar (current setup, last run, help)."""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import streamlit as st

from ood_core import data as data_mod
from ood_core.core import output_text
from ood_lens_app.errors import is_expected, page_message

T = TypeVar("T")

LOG = logging.getLogger("ood_lens.app")


@dataclass(frozen=True)
class Page:
    """A page file (relative to ``app.py``), its navigation title and icon."""

    path: str
    title: str
    icon: str


PAGE_MODEL = Page("views/model_data.py", "Model & data", ":material/model_training:")
PAGE_LAYERS = Page("views/layers.py", "Layers", ":material/layers:")
PAGE_SCORES = Page("views/scores.py", "Scores & scenarios", ":material/tune:")
PAGE_RESULTS = Page("views/results.py", "Results", ":material/insights:")
PAGE_RUNS = Page("views/runs.py", "Runs", ":material/history:")
PAGES = [PAGE_MODEL, PAGE_LAYERS, PAGE_SCORES, PAGE_RESULTS, PAGE_RUNS]
"""In navigation order; the first is the default page."""

HELP = (
    "1. **Model & data**: classifier and in-distribution (InD) data.\n"
    "2. **Layers**: click rows to pick the layers scores read.\n"
    "3. **Scores & scenarios**: detectors, their parameters, OoD sets; **Run**.\n"
    "4. **Results**: histograms, ROC, metrics, thresholds, images, export.\n"
    "5. **Runs**: every run is saved (the URL names it: reload or bookmark to get it back); "
    "open, delete or compare two.\n\n"
    "Confidence: higher = more in-distribution. A sample is flagged OoD when its "
    "confidence ≤ threshold; OoD is the positive class of every metric."
)


def guard(body: Callable[[], T]) -> T | None:
    """Run a page body and return what it returns; an error becomes ``st.error``
    (:func:`~ood_lens_app.errors.page_message`, then None), the traceback of an unexpected one
    goes to the server log."""
    try:
        return body()
    except Exception as exc:  # noqa: BLE001 - pages must never show raw tracebacks
        if not is_expected(exc):
            LOG.error("Unexpected error in a page:\n%s", traceback.format_exc())
        st.error(page_message(exc), icon=":material/error:")
        return None


def header(title: str, help_text: str) -> None:
    st.title(title)
    st.caption(help_text)


def go_to(page: Page) -> None:
    """Switch page (when running under st.navigation) or say where to go; the run on screen
    stays named in the URL (``?run=ID``: a switch drops query parameters it is not given)."""
    run_id = st.query_params.get("run")
    try:
        st.switch_page(page.path, query_params={"run": run_id} if run_id else None)
    except st.errors.StreamlitAPIException:
        st.info(f"Open **{page.title}** from the sidebar.")


def next_link(page: Page, label: str) -> None:
    """A link to the next page (nothing when the page runs outside st.navigation)."""
    with contextlib.suppress(st.errors.StreamlitAPIException):
        st.page_link(page.path, label=label, icon=":material/arrow_forward:")


def fmt_layers(layers: list[str]) -> str:
    return ", ".join(layers) if layers else "none"


def sidebar_lines(state: Mapping[str, Any]) -> list[str]:
    """The sidebar's "Current setup" as markdown paragraphs."""
    repo = state["model_repo"]
    title = data_mod.BUNDLED.get(state["ind_source"], {}).get("title", state["ind_source"])
    n_cal, n_test = (state[k] if state[k] is not None else "all" for k in ("w.n_cal", "w.n_test"))
    output = state.get("model_output")
    read = "" if output is None else f", output `{output_text(output).replace('`', '')}`"
    lines = [
        f"**Model:** `{state['model_entry']}` ({'bundled hub' if repo == 'bundled' else repo})"
        + read,
        f"**InD data:** {title}  \n{n_cal} calibration / {n_test} test",
        f"**Layers:** {fmt_layers(state['layers'])}",
    ]
    last = state.get("last_run")
    if last:
        lines.append(
            f"**Last run:** {last['when']} · {last['seconds']:.1f} s  \n"
            f"accuracy {last['accuracy']:.1%} · {last['n_scores']} scores × "
            f"{last['n_oods']} OoD sets"
            + _passes_text(last.get("forward_calls"), last.get("own_pass_scores", []))
        )
    else:
        lines.append("**Last run:** none yet")
    if state.get("run_status") == "cancelled":
        lines.append("**Run status:** the last run was cancelled")
    return lines


def _passes_text(calls: int | None, own: list[str]) -> str:
    """The last run's forward passes, as the sidebar says them ("" when not recorded): the
    shared passes' batches, and the scores that ran their own passes (never cached)."""
    if calls is None:
        return ""
    text = (
        "no shared forward pass (cached features)"
        if calls == 0
        else f"{calls:,} forward-pass batch{'es' if calls != 1 else ''}"
    )
    if own:
        text += f"; own passes: {', '.join(own)}"
    return "  \n" + text


def saved_line(state: Mapping[str, Any]) -> str | None:
    """The sidebar's line on the run on screen: "Saving as" while its bundle is written in the
    background, "Saved as" once written (None: no run id)."""
    from ood_lens_app import run_store

    run_id = state.get("run_id")
    if not run_id:
        return None
    return f"**{'Saving' if run_store.is_saving(run_id) else 'Saved'} as:** `{run_id}`"


def sidebar() -> Callable[[], None]:
    """Current model / data / layers / run status, and short help (shown on every page).

    Returns what settles the save of the run on screen, to call once the page is drawn: it
    waits for the background save (the page is not held up by it) and turns "Saving as" into
    "Saved as", or into a warning (here and above the page) when the store could not save it,
    never "Saved as"."""
    top = st.empty()  # above the page: a save that failed is said there too
    with st.sidebar:
        st.markdown("### Current setup")
        for line in sidebar_lines(st.session_state):
            st.markdown(line)
        slot = st.empty()
        line = saved_line(st.session_state)
        if line:
            slot.markdown(line)
        with st.expander("Help", icon=":material/help:"):
            st.markdown(HELP)

    def settle() -> None:
        from ood_lens_app import runs

        shown = st.session_state.get("run_id")
        problem = runs.check_saved(st.session_state)  # waits for a background save
        if problem:
            if shown and st.query_params.get("run") == shown:
                del st.query_params["run"]  # the URL must not name a run that does not exist
            top.warning(problem, icon=":material/warning:")
            slot.warning(problem, icon=":material/warning:")
        elif (line := saved_line(st.session_state)) is not None:
            slot.markdown(line)

    return settle


# ---------------------------------------------------------------------------- run state
def restore_from_url() -> None:
    """A URL naming a saved run (``?run=ID``) that is not on screen: restore it (settings and
    result); otherwise put the id on screen into the URL. A saved run whose model repository is
    not trusted in this session waits for its trust box (:func:`runs.restore_trust_prompt`)."""
    from ood_lens_app import runs

    asked = runs.sync_url(st.session_state, st.query_params)
    if asked and runs.restore_run(asked) is None and not st.session_state.get("trust_request"):
        st.error(st.session_state["run_error"], icon=":material/error:")
    runs.restore_trust_prompt()


def pending_notice() -> None:
    """A URL naming a Run in progress (``?pending=TOKEN``) that this session did not start (the
    page was reloaded during a Run): what became of it (:mod:`ood_lens_app.in_flight`), with
    Open for a saved run, Check again while it runs, Dismiss otherwise."""
    from ood_lens_app import in_flight

    ss = st.session_state
    token = st.query_params.get(in_flight.URL_KEY)
    if not token or token == ss.get("own_pending"):
        return
    entry = in_flight.lookup(token)
    kind, text = in_flight.message(entry)
    c1, c2 = st.columns([6, 1], vertical_alignment="center")
    getattr(c1, kind)(text, icon=":material/history:")
    if entry is not None and entry["status"] == "running":
        if c2.button("Check again", key="pending_check", icon=":material/refresh:"):
            st.rerun()
        return
    saved = entry is not None and entry["status"] == "done" and entry["run_id"]
    if c2.button("Open" if saved else "Dismiss", key="pending_close"):
        del st.query_params[in_flight.URL_KEY]
        if saved:
            st.query_params["run"] = entry["run_id"]
        st.rerun()


def run_notices() -> None:
    """Says so when the last run was cancelled (the page changed before it finished), with
    Run again; the result on screen, if any, is the earlier one. Before it: what became of a
    Run the page was reloaded during (:func:`pending_notice`)."""
    from ood_lens_app import runs

    pending_notice()
    ss = st.session_state
    if ss.get("run_status") != "cancelled":
        return
    c1, c2, c3 = st.columns([6, 1, 1], vertical_alignment="center")
    c1.warning(
        f"The run started at {ss.get('run_started', '?')} was cancelled: the page changed "
        "before it finished. "
        + ("The results shown are from the run before." if ss.get("result") else ""),
        icon=":material/cancel:",
    )
    if c2.button("Run again", key="rerun_cancelled", icon=":material/replay:"):
        if runs.execute_run(ss["run_request"]) is not None:
            st.rerun()
        st.error(ss["run_error"], icon=":material/error:")
    if c3.button("Dismiss", key="dismiss_cancelled"):
        ss["run_status"] = None
        st.rerun()


def stale_banner() -> None:
    """On the Results page: a banner when the current settings (the config the form builds)
    differ from those of the result on screen, with Run."""
    from ood_lens_app import form, loaders, runs

    ss = st.session_state
    shown = ss.get("result_request")
    if ss.get("result") is None or shown is None:
        return
    config, problems = form.build_config(ss, loaders.current_layer_choices())
    if config is not None and runs.same_settings(config, shown):
        return
    c1, c2 = st.columns([6, 1], vertical_alignment="center")
    if config is None:
        c1.warning(
            "The settings changed since this result and have problems: fix them on "
            "**Scores & scenarios** to run them.",
            icon=":material/sync_problem:",
        )
        return
    c1.warning(
        "The settings changed since this result was computed: what is shown is the earlier "
        "run. Run the current settings to update it.",
        icon=":material/sync_problem:",
    )
    if c2.button("Run", key="stale_run", type="primary", icon=":material/play_arrow:"):
        if runs.execute_run(config) is None:
            st.error(ss["run_error"], icon=":material/error:")
            return
        st.rerun()


# ---------------------------------------------------------------------------- controls
_TAGS = '[data-testid="stMultiSelectTagsContainer"]'
CONTROLS_CSS = (
    "<style>"
    # selected multiselect chips: on several lines (the box grows) rather than scrolled away
    # under a fade, each with its whole label (not "TPR(max_fpr=...")
    f"{_TAGS}{{flex-wrap:wrap!important;overflow:visible!important;height:auto!important;"
    "mask-image:none!important;-webkit-mask-image:none!important;row-gap:0.25rem;"
    "padding-top:0.25rem;padding-bottom:0.25rem}"
    f".stMultiSelect div:has(> {_TAGS}){{height:auto!important;max-height:none!important}}"
    f"{_TAGS} span{{max-width:none!important;white-space:normal;overflow:visible!important;"
    "text-overflow:clip!important;overflow-wrap:anywhere}"
    "</style>"
)
"""CSS of the form pages: readable multiselect chips."""


def controls_css() -> None:
    """Inject :data:`CONTROLS_CSS` (the form pages call it)."""
    st.html(CONTROLS_CSS)
