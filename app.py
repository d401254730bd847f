"""ood-lens dashboard: ``streamlit run app.py`` (or ``./dev app``).

Four pages (``views/``, UI only) walk through one evaluation: model & data, layers, scores &
scenarios, results; a fifth lists the saved runs (open, delete, compare). Their logic is the
:mod:`ood_lens_app` package; all computation goes through :mod:`ood_core`. Before a page: a run
left unfinished is marked cancelled, a replayed config is put into the widgets, a URL naming a
saved run (``?run=ID``) restores it, and the Results page says when the settings changed.
The page files live in ``views/``, not ``pages/``, on purpose: Streamlit (1.67) still runs its
legacy ``pages/``-folder navigation (``PagesManager.uses_pages_directory``) for the first script
run of a server process when a ``pages/`` folder sits beside the main script, so a deep link as
the first request (``/results?run=ID`` after a restart) would run that page without this script.
Environment: ``OOD_LENS_DEFAULT_N`` sets the default calibration / test sizes, ``OOD_LENS_RUNS``
the run store folder.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from ood_lens_app import layout, runs, state

FAVICON = Path(__file__).resolve().parent / "assets" / "favicon.png"
"""The browser-tab icon, served by this server: a ``:material/...:`` page_icon would make the
browser fetch an SVG from fonts.gstatic.com on every page change (and fail offline); the page
icons of the navigation are then never used as the favicon."""

st.set_page_config(layout="wide", page_title="ood-lens", page_icon=str(FAVICON))
state.init_state()
runs.check_cancelled(st.session_state)
if (pending := st.session_state.pop("pending_settings", None)) is not None:
    runs.apply_config(st.session_state, pending)
nav = st.navigation(
    [
        st.Page(p.path, title=p.title, icon=p.icon, default=(p == layout.PAGES[0]))
        for p in layout.PAGES
    ]
)
st.html("<style>[data-testid='stMainBlockContainer']{padding-top:2.5rem}</style>")
layout.guard(layout.restore_from_url)
layout.guard(layout.run_notices)
if nav.url_path == "results":
    layout.guard(layout.stale_banner)
settle_save = layout.guard(layout.sidebar)
nav.run()
if settle_save is not None:  # once the page is drawn: "Saved as", or why the run was not saved
    layout.guard(settle_save)
