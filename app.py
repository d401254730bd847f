"""ood-lens dashboard: ``streamlit run app.py``.

Four pages (``pages/``) walk through one evaluation: model & data, layers, scores & scenarios,
results. All computation goes through :mod:`ood_core`; state lives in ``st.session_state`` (see
``pages/common.py``). Environment: ``OOD_LENS_DEFAULT_N`` sets the default calibration / test
sizes (1000).
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pages import common  # noqa: E402

st.set_page_config(layout="wide", page_title="ood-lens", page_icon=":material/center_focus_weak:")
common.init_state()
nav = st.navigation(
    [
        st.Page(common.PAGE_MODEL, title="Model & data", icon=":material/model_training:",
                default=True),
        st.Page(common.PAGE_LAYERS, title="Layers", icon=":material/layers:"),
        st.Page(common.PAGE_SCORES, title="Scores & scenarios", icon=":material/tune:"),
        st.Page(common.PAGE_RESULTS, title="Results", icon=":material/insights:"),
    ]
)  # fmt: skip
st.html("<style>[data-testid='stMainBlockContainer']{padding-top:2.5rem}</style>")
common.guard(common.sidebar)
nav.run()
