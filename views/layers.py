"""Page "Layers": the network's layer table; selected rows are the layers scores read."""

from __future__ import annotations

import streamlit as st

from ood_lens_app import layers, layout, loaders, state

state.init_state()
ss = st.session_state

QUICK_PICKS = [  # button label, quick-pick key (None: clear), help
    ("Logits", "logits", "The classifier's last Linear layer (the logits)."),
    ("Penultimate", "penultimate", "The layer feeding the logits (the penultimate features)."),
    ("Each block", "blocks", "Every depth-1 block / stage (modules with sub-layers)."),
    ("Clear", None, "Select no layer."),
]


def body() -> None:
    layout.header(
        "Layers",
        "Click rows (the boxes on the left) to choose the layers whose "
        "activations the scores read; ids are torchinfo's depth-index, e.g. 1-11.",
    )
    choices = loaders.current_layer_choices()
    table, ids, names = choices.table, choices.ids, choices.names()
    layers.keep_known(ss, ids)
    cols = st.columns([1, 1.3, 1.1, 0.8, 2.8])
    for col, (label, key, helptext) in zip(cols, QUICK_PICKS, strict=False):
        pick = choices.pick(key) if key else []
        col.button(
            label,
            key=f"pick_{label}",
            help=helptext,
            on_click=layers.set_selection,
            args=(ss, pick),
            disabled=(key is not None and not pick),
            width="stretch",
        )
    st.dataframe(
        layers.display_table(table),
        key=layers.table_key(ss),
        on_select=lambda: layers.select_rows(ss, ids),
        selection_mode="multi-row",
        hide_index=True,
        height=min(38 + 35 * len(table), 560),
        selection_default={"selection": {"rows": [ids.index(lid) for lid in ss["layers"]]}},
        column_config={
            "id": st.column_config.TextColumn("id", help="(depth, index) as 'd-i'", width="small"),
            "name": st.column_config.TextColumn("name", help="Module name (indented by depth)"),
            "type": "type",
            "input_shape": "input shape",
            "output_shape": "output shape",
            "params": st.column_config.NumberColumn(
                "params", help="Parameters, children included", format="%d"
            ),
            "params_pct": st.column_config.NumberColumn(
                "params %", help="Own parameters, % of the network", format="%.2f"
            ),
        },
    )
    ss["layers_ms"] = list(ss["layers"])
    st.multiselect(
        "Selected layers",
        ids,
        key="layers_ms",
        on_change=lambda: layers.select_from_multiselect(ss),
        format_func=lambda lid: f"{lid} · {names.get(lid, '')}",
        help="The same selection as the table's; edit either.",
    )
    st.caption(
        "Scores use this selection by default (filtered by what each score accepts); "
        "adjust it per score on the next page."
    )
    layout.next_link(layout.PAGE_SCORES, "Next: scores & scenarios")


layout.guard(body)
