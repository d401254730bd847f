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
    ss.setdefault(layers.DEPTHS_KEY, [])
    ss.setdefault(layers.SELECTED_ONLY_KEY, False)
    ss[layers.DEPTHS_KEY] = [d for d in ss[layers.DEPTHS_KEY] if d in layers.table_depths(table)]
    f1, f2 = st.columns([3, 1], vertical_alignment="bottom")
    f1.multiselect(
        "Depths shown",
        layers.table_depths(table),
        key=layers.DEPTHS_KEY,
        placeholder="All depths",
        on_change=layers.rebuild_table,
        args=(ss,),
        help="Show only layers at these depths (0 = the whole network, 1 = its children, ...).",
    )
    f2.toggle(
        "Selected only",
        key=layers.SELECTED_ONLY_KEY,
        on_change=layers.rebuild_table,
        args=(ss,),
        help="Show only the selected layers.",
    )
    shown = layers.filter_table(
        table, ss[layers.DEPTHS_KEY], ss["layers"], ss[layers.SELECTED_ONLY_KEY]
    )
    visible = [str(i) for i in shown["id"]]
    st.dataframe(
        layers.display_table(shown),
        key=layers.table_key(ss),
        on_select=lambda: layers.select_rows(ss, visible, ids),
        selection_mode="multi-row",
        hide_index=True,
        height=min(38 + 35 * max(len(shown), 1), 560),
        selection_default={
            "selection": {"rows": [visible.index(lid) for lid in ss["layers"] if lid in visible]}
        },
        column_config={
            "id": st.column_config.TextColumn(
                "id", help=f"Layer id: {layers.ID_NOTATION}", width="small"
            ),
            "name": st.column_config.TextColumn("name", help="Module name (indented by depth)"),
            "type": "type",
            "input_shape": "input shape",
            "output_shape": "output shape",
            "params": st.column_config.NumberColumn(
                "params", help="Parameters, children included", format="localized"
            ),
            "params_pct": st.column_config.NumberColumn(
                "params %", help="Own parameters, % of the network", format="%.2f"
            ),
        },
    )
    if shown.empty:
        st.caption("No layer matches the filters.")
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
