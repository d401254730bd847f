"""Unit tests of the comfortable controls: score panels kept open while edited, readable
chips, the layer table's depth filter and "selected only" view (ood_lens_app.widgets/layers/
layout)."""

from __future__ import annotations

import pandas as pd

from ood_lens_app import layers, layout, widgets


def _table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": ["0-1", "1-1", "1-2", "2-1", "2-2", "1-3"],
            "depth": [0, 1, 1, 2, 2, 1],
            "name": ["Net", "conv", "block", "conv", "act", "fc"],
            "params": [1234567, 20, 1200, 1200, 0, 9],
        }
    )


def test_a_panel_stays_open_once_edited() -> None:
    state: dict = {}
    assert not widgets.is_open(state, "KNN")
    widgets.mark_open(state, "KNN")
    assert widgets.is_open(state, "KNN") and not widgets.is_open(state, "Softmax")
    assert widgets.open_key("KNN") in state


def test_depths_and_filters() -> None:
    table = _table()
    assert layers.table_depths(table) == [0, 1, 2]
    assert layers.filter_table(table).equals(table)  # no filter: every row
    assert list(layers.filter_table(table, [1])["id"]) == ["1-1", "1-2", "1-3"]
    assert list(layers.filter_table(table, [0, 2])["id"]) == ["0-1", "2-1", "2-2"]
    only = layers.filter_table(table, (), ["1-3", "2-1"], selected_only=True)
    assert list(only["id"]) == ["2-1", "1-3"] and list(only.index) == [0, 1]
    both = layers.filter_table(table, [1], ["1-3", "2-1"], selected_only=True)
    assert list(both["id"]) == ["1-3"]
    assert layers.filter_table(table, (), [], selected_only=True).empty
    # selected only is ignored when off
    assert len(layers.filter_table(table, (), ["1-3"], selected_only=False)) == len(table)


def test_selecting_in_a_filtered_table_keeps_hidden_layers() -> None:
    ids = list(_table()["id"])
    visible = ["1-1", "1-2", "1-3"]  # depth 1 shown
    state: dict = {"layers": ["2-1", "1-3"], "layers_version": 3}
    state[layers.table_key(state)] = {"selection": {"rows": [0, 2]}}
    layers.select_rows(state, visible, ids)
    assert state["layers"] == ["1-1", "2-1", "1-3"] == state["layers_ms"]  # table order
    assert state["layers_version"] == 3  # the rows shown do not depend on the selection


def test_unticking_in_selected_only_rebuilds_the_table() -> None:
    ids = list(_table()["id"])
    state: dict = {"layers": ["1-1", "1-3"], "layers_version": 0}
    state[layers.SELECTED_ONLY_KEY] = True
    state[layers.table_key(state)] = {"selection": {"rows": [1]}}
    layers.select_rows(state, ["1-1", "1-3"], ids)
    assert state["layers"] == ["1-3"] and state["layers_version"] == 1
    layers.rebuild_table(state)
    assert state["layers_version"] == 2


def test_select_rows_without_order_is_unchanged() -> None:
    state: dict = {"layers": ["9-9"], "layers_version": 0}
    state[layers.table_key(state)] = {"selection": {"rows": [1, 0]}}
    layers.select_rows(state, ["a", "b"])
    assert state["layers"] == ["a", "b"]


def test_chips_are_not_truncated() -> None:
    css = layout.CONTROLS_CSS
    assert '[data-testid="stMultiSelectTagsContainer"]' in css and "flex-wrap:wrap" in css
    assert "mask-image:none" in css and "max-height:none" in css and "max-width:none" in css


def test_layer_ids_have_one_notation() -> None:
    from ood_core.layer_ids import layer_text

    assert layer_text((1, 11)) == "1-11"
    assert "1-11" in layers.ID_NOTATION
