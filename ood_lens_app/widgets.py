"""Widgets generated from ``Param`` descriptions (``Param.as_dict()`` / ``describe_params()``).

What a widget shows is derived by plain functions of a description (:func:`widget_kind`,
:func:`initial_value`, :func:`int_bounds`, :func:`float_bounds`, :func:`clamp`,
:func:`float_step`, :func:`help_text`); :func:`param_widgets` only draws them. Bounds come from
the description's flags (``low_exclusive`` / ``high_exclusive``), never from its range text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

from ood_lens_app.state import param_key

Desc = dict[str, Any]


def none_key(owner: str, name: str) -> str:
    """State key of the "None" checkbox of a nullable parameter."""
    return f"{param_key(owner, name)}.none"


def open_key(owner: str) -> str:
    """State key of the flag keeping ``owner``'s panel (expander) open once it was edited."""
    return f"open.{owner}"


def mark_open(state: MutableMapping[str, Any], owner: str) -> None:
    """A widget of ``owner`` changed: its panel stays open on the reruns that follow
    (Streamlit redraws an expander whose title changed collapsed unless told otherwise)."""
    state[open_key(owner)] = True


SWEEP_N_BOOT = 200
"""Bootstrap resamples a sweep turns on when intervals are off (a study compares close points:
0.864 vs 0.863 cannot be judged without them)."""


def sweep_changed(state: MutableMapping[str, Any], owner: str) -> None:
    """A sweep of ``owner`` was turned on or edited: its panel stays open, and bootstrap
    intervals are switched on (:data:`SWEEP_N_BOOT`) when they were off; the Bootstrap field
    shows it and can be set back to 0."""
    mark_open(state, owner)
    if int(state.get("w.n_boot", 0) or 0) == 0:
        state["w.n_boot"] = SWEEP_N_BOOT
        state["sweep_boot_note"] = (
            f"A sweep compares close values: bootstrap intervals were turned on "
            f"({SWEEP_N_BOOT} resamples). Set Bootstrap resamples to 0 to turn them off."
        )


def is_open(state: MutableMapping[str, Any], owner: str) -> bool:
    """Whether ``owner``'s panel was edited (see :func:`mark_open`)."""
    return bool(state.get(open_key(owner), False))


def is_text_float(desc: Desc) -> bool:
    """A float whose default is not finite (e.g. ``inf``): typed as text, as number inputs
    cannot hold infinities."""
    d = desc.get("default")
    return desc["type"] == "float" and isinstance(d, float) and not math.isfinite(d)


def widget_kind(desc: Desc) -> str:
    """``"checkbox"``, ``"select"``, ``"text"``, ``"int"`` or ``"float"``."""
    t = desc["type"]
    if t == "bool":
        return "checkbox"
    if t == "choice":
        return "select"
    if t in ("str", "list") or is_text_float(desc):
        return "text"
    return "int" if t == "int" else "float"


def int_bounds(desc: Desc) -> tuple[int | None, int | None]:
    """Inclusive integer bounds of an int parameter (an exclusive bound moves inwards by 1)."""
    lo = int(desc["low"]) if desc.get("low") is not None else None
    hi = int(desc["high"]) if desc.get("high") is not None else None
    if lo is not None and desc.get("low_exclusive"):
        lo += 1
    if hi is not None and desc.get("high_exclusive"):
        hi -= 1
    return lo, hi


def float_bounds(desc: Desc) -> tuple[float | None, float | None]:
    """Bounds a float number input can enforce: the inclusive ones (an exclusive bound is left
    to the parameter's own validation, whose message then names the allowed range)."""
    lo = desc.get("low")
    hi = desc.get("high")
    return (
        float(lo) if lo is not None and not desc.get("low_exclusive") else None,
        float(hi) if hi is not None and not desc.get("high_exclusive") else None,
    )


def _fallback_number(desc: Desc) -> float | int:
    """A value inside the bounds for a number parameter without a default."""
    low, high = desc.get("low"), desc.get("high")
    if low is None:
        return 1
    step = 0 if not desc.get("low_exclusive") else (1 if desc["type"] == "int" else 1.0)
    value = low + step
    return value if high is None else min(value, high)


def initial_value(desc: Desc) -> Any:
    """The widget's first value: the default, as the widget holds it (text for lists and
    non-finite floats; a value inside the bounds when there is no default)."""
    d = desc.get("default")
    t = desc["type"]
    if t == "list":
        return "" if d is None else ", ".join(str(v) for v in d)
    if is_text_float(desc):
        return str(d)
    if t == "float":
        return float(_fallback_number(desc) if d is None else d)
    if t == "int":
        return int(_fallback_number(desc) if d is None else d)
    if t == "choice" and d is None:
        return desc["choices"][0]
    if t == "str" and d is None:
        return ""
    return d


def clamp(desc: Desc, value: Any) -> Any:
    """``value`` as the number widget of ``desc`` can hold it: a number of the right type inside
    its bounds (a non-number becomes :func:`initial_value`)."""
    kind = widget_kind(desc)
    if kind == "int":
        lo, hi = int_bounds(desc)
        v = (
            int(value)
            if isinstance(value, int | float) and math.isfinite(value)
            else initial_value(desc)
        )
    elif kind == "float":
        lo, hi = float_bounds(desc)
        v = float(value) if isinstance(value, int | float) else float(initial_value(desc))
    else:
        return value
    if lo is not None:
        v = max(v, lo)
    if hi is not None:
        v = min(v, hi)
    return v


def float_step(value: float) -> float:
    """Step of a float input: a tenth of ``value``'s order of magnitude (0.1 for 0)."""
    scale = abs(value)
    return 10.0 ** math.floor(math.log10(scale)) / 10 if scale > 0 and math.isfinite(scale) else 0.1


def help_text(desc: Desc) -> str:
    """The widget's tooltip: the parameter's help and its allowed values."""
    text = f"{desc.get('help', '')} Allowed: {desc.get('range', '')}.".strip()
    return text + (" Comma-separated or JSON list." if desc["type"] == "list" else "")


def param_widgets(
    owner: str,
    descs: Sequence[Desc],
    state: MutableMapping[str, Any] | None = None,
    on_change: Callable[[], None] | None = None,
) -> None:
    """Draw one widget per parameter of ``owner`` in two columns; values live in ``state``
    under :func:`~ood_lens_app.state.param_key` (read back by :func:`ood_lens_app.form.param_values`).
    ``on_change`` is called when any of them changes (default: :func:`mark_open` of ``owner``)."""
    import streamlit as st

    ss = st.session_state if state is None else state
    changed = on_change if on_change is not None else (lambda: mark_open(ss, owner))
    cols = st.columns(2)
    for i, desc in enumerate(descs):
        name = desc["name"]
        key = param_key(owner, name)
        ss.setdefault(key, initial_value(desc))
        with cols[i % 2]:
            disabled = False
            if desc.get("nullable"):
                nkey = none_key(owner, name)
                ss.setdefault(nkey, desc.get("default") is None)
                st.checkbox(
                    f"{name}: None",
                    key=nkey,
                    help=f"Use None for {name} ({desc.get('help', '')})",
                    on_change=changed,
                )
                disabled = bool(ss[nkey])
            kind = widget_kind(desc)
            common = {
                "key": key,
                "help": help_text(desc),
                "disabled": disabled,
                "on_change": changed,
            }
            if kind == "checkbox":
                st.checkbox(name, **common)
            elif kind == "select":
                options = list(desc["choices"])
                if ss[key] not in options:
                    ss[key] = options[0]
                st.selectbox(name, options, **common)
            elif kind == "text":
                st.text_input(name, **common)
            elif kind == "int":
                ss[key] = clamp(desc, ss[key])
                lo, hi = int_bounds(desc)
                st.number_input(name, min_value=lo, max_value=hi, step=1, **common)
            else:
                ss[key] = clamp(desc, ss[key])
                lo, hi = float_bounds(desc)
                st.number_input(
                    name,
                    min_value=lo,
                    max_value=hi,
                    step=float_step(ss[key]),
                    format="%g",
                    **common,
                )
