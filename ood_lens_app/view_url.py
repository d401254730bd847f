"""The Results page's view state in the URL, beside ``?run=ID``: the open tab, the threshold
explorer's score (by name), its mode and its acceptance or raw threshold, so that a reload
(F5: a new session) or a shared link opens the same view.

URL keys (all optional; an invalid value is ignored, never an error): ``tab`` (a tab title),
``score`` (a score name as the tables show it), ``mode`` (``accept`` or ``raw``), ``accept``
(the InD acceptance in [0.5, 1]) and ``thr`` (the raw threshold, a finite float). They are read
once per session and run (:func:`read`), before the widgets are drawn, and written back after
(:func:`write`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from ood_lens_app.result_views import THRESHOLD_MODES

TAB_KEY = "w.res_tab"
"""Session key of the Results page's open tab."""
SCORE_KEY, MODE_KEY, ACCEPT_KEY, RAW_KEY = "w.thr_score", "w.thr_mode", "w.thr_accept", "w.thr_raw"
READ_KEY = "view_url_read"
"""Session key: the run id whose view was read from the URL (read once per session and run)."""
MODES = {"accept": THRESHOLD_MODES[0], "raw": THRESHOLD_MODES[1]}
URL_KEYS = ("tab", "score", "mode", "accept", "thr")


def _float(text: Any, lo: float = -math.inf, hi: float = math.inf) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and lo <= value <= hi else None


def read(
    state: MutableMapping[str, Any],
    params: Mapping[str, Any],
    run_id: str | None,
    tabs: Sequence[str],
    score_names: Sequence[str],
) -> None:
    """Put the URL's view into the widget state, once per session and run (``run_id``; None:
    a result not saved, nothing read): later re-runs keep what the person chose."""
    if not run_id or state.get(READ_KEY) == run_id or params.get("run") != run_id:
        return
    state[READ_KEY] = run_id
    if params.get("tab") in tabs:
        state[TAB_KEY] = params["tab"]
    if params.get("score") in score_names:
        state[SCORE_KEY] = list(score_names).index(params["score"])
    if params.get("mode") in MODES:
        state[MODE_KEY] = MODES[params["mode"]]
    if (accept := _float(params.get("accept"), 0.5, 1.0)) is not None:
        state[ACCEPT_KEY] = accept
    if (raw := _float(params.get("thr"))) is not None:
        state[RAW_KEY] = raw


def view(state: Mapping[str, Any], score_names: Sequence[str]) -> dict[str, str]:
    """The URL keys of the view in ``state`` (only those it holds)."""
    out: dict[str, str] = {}
    if isinstance(state.get(TAB_KEY), str):
        out["tab"] = state[TAB_KEY]
    i = state.get(SCORE_KEY)
    if isinstance(i, int) and 0 <= i < len(score_names):
        out["score"] = score_names[i]
    mode = next((k for k, v in MODES.items() if v == state.get(MODE_KEY)), None)
    if mode is not None:
        out["mode"] = mode
        which, key = ("accept", ACCEPT_KEY) if mode == "accept" else ("thr", RAW_KEY)
        if _float(state.get(key)) is not None:
            out[which] = f"{float(state[key]):.6g}"
    return out


def write(
    state: Mapping[str, Any], params: MutableMapping[str, Any], score_names: Sequence[str]
) -> None:
    """Write the view into the URL (next to ``run``; keys it no longer holds removed), only
    while the URL names a run: a view without a saved run has nothing to reopen."""
    if not params.get("run"):
        return
    wanted = view(state, score_names)
    for key in URL_KEYS:
        if key in wanted:
            if params.get(key) != wanted[key]:
                params[key] = wanted[key]
        elif key in params:
            del params[key]
