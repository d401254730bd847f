"""ood-lens dashboard: ``streamlit run app.py`` (or ``./dev app``).

Four pages (``views/``, UI only) walk through one evaluation: model & data, layers, scores &
scenarios, results. Their logic is the :mod:`ood_lens_app` package; all computation goes through
:mod:`ood_core`. Environment: ``OOD_LENS_DEFAULT_N`` sets the default calibration / test sizes.
"""

from __future__ import annotations

import streamlit as st

from ood_lens_app import layout, state

st.set_page_config(layout="wide", page_title="ood-lens", page_icon=":material/center_focus_weak:")
state.init_state()
nav = st.navigation(
    [
        st.Page(p.path, title=p.title, icon=p.icon, default=(p == layout.PAGES[0]))
        for p in layout.PAGES
    ]
)
st.html("<style>[data-testid='stMainBlockContainer']{padding-top:2.5rem}</style>")
layout.guard(layout.sidebar)
nav.run()
