"""Page 2 - Layers: the network's layer table; selected rows are the layers scores read."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import streamlit as st

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ood_core import explore  # noqa: E402
from pages import common  # noqa: E402

common.init_state()
ss = st.session_state

COLUMNS = ["id", "name", "type", "input_shape", "output_shape", "params", "params_pct"]


def _table_key() -> str:
    return f"layer_table_{ss['layers_version']}"


def _set_layers(layers: list[str]) -> None:
    """Programmatic selection: store it and rebuild the table widget so it shows it."""
    ss["layers"] = list(dict.fromkeys(layers))
    ss["layers_version"] += 1
    ss["layers_ms"] = list(ss["layers"])


def _on_table_select(ids: list[str]) -> None:
    state = ss.get(_table_key())
    rows = list(state["selection"]["rows"]) if state else []
    ss["layers"] = [ids[r] for r in sorted(rows) if 0 <= r < len(ids)]
    ss["layers_ms"] = list(ss["layers"])


def _on_multiselect() -> None:
    ss["layers"] = list(ss["layers_ms"])
    ss["layers_version"] += 1


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    shown = table[COLUMNS].copy()
    indent = table["depth"].clip(lower=0).map(lambda d: "\u2003" * max(0, d - 1))
    shown["name"] = indent + shown["name"]
    return shown


def body() -> None:
    common.header("Layers", "Click rows (the boxes on the left) to choose the layers whose "
                  "activations the scores read; ids are torchinfo's depth-index, e.g. 1-11.")  # fmt: skip
    table = common.current_layer_table()
    ids = [str(i) for i in table["id"]]
    stored = [lid for lid in ss["layers"] if lid in ids]
    if stored != ss["layers"]:
        ss["layers"] = stored
    picks = explore.layer_quick_picks(table)
    cols = st.columns([1, 1.4, 1.1, 0.8, 2.7])
    for col, (label, pick, helptext) in zip(cols, [
        ("Logits", picks["logits"], "The last Linear layer (the logits)."),
        ("Pooled features", picks["pooled"], "The last pooling layer (penultimate features)."),
        ("Each block", picks["blocks"], "Every depth-1 block / stage / Sequential."),
        ("Clear", [], "Select no layer."),
    ], strict=False):  # fmt: skip
        col.button(label, key=f"pick_{label}", help=helptext, on_click=_set_layers, args=(pick,),
                   disabled=(label != "Clear" and not pick), width="stretch")  # fmt: skip
    rows = [ids.index(lid) for lid in ss["layers"]]
    st.dataframe(
        display_table(table), key=_table_key(), on_select=lambda: _on_table_select(ids),
        selection_mode="multi-row", hide_index=True, height=min(38 + 35 * len(table), 560),
        selection_default={"selection": {"rows": rows}},
        column_config={
            "id": st.column_config.TextColumn("id", help="(depth, index) as 'd-i'", width="small"),
            "name": st.column_config.TextColumn("name", help="Module name (indented by depth)"),
            "type": "type",
            "input_shape": "input shape",
            "output_shape": "output shape",
            "params": st.column_config.NumberColumn("params", help="Parameters, children included",
                                                    format="%d"),
            "params_pct": st.column_config.NumberColumn("params %", help="Own parameters, % of "
                                                        "the network", format="%.2f"),
        },
    )  # fmt: skip
    ss["layers_ms"] = list(ss["layers"])
    st.multiselect("Selected layers", ids, key="layers_ms", on_change=_on_multiselect,
                   format_func=lambda lid: f"{lid} · {table.loc[ids.index(lid), 'name']}",
                   help="The same selection as the table's; edit either.")  # fmt: skip
    st.caption("Scores use this selection by default (filtered by what each score accepts); "
               "adjust it per score on the next page.")
    common.next_link(common.PAGE_SCORES, "Next: scores & scenarios")


common.guard(body)
