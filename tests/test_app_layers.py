"""Unit tests of ood_lens_app.layers: quick picks from the Recorder, what a score may read,
per-score defaults following the Layers page, the selection's state changes."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from ood_lens_app import layers
from ood_lens_app.layers import LayerChoices


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class _Net(nn.Module):
    """conv (1-1), block (1-2), sequential (1-3), pool (1-4), linear head (1-5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.block = _Block()
        self.seq = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.seq(self.block(self.conv(x)))), 1))


def _table() -> pd.DataFrame:
    rows = [
        ("0-1", 0, "Net", 100, 0),
        ("1-1", 1, "Conv2d", 10, 10),
        ("1-2", 1, "Block", 40, 0),
        ("2-1", 2, "Conv2d", 40, 40),
        ("1-3", 1, "Sequential", 20, 0),
        ("1-4", 1, "AdaptiveAvgPool2d", 0, 0),
        ("1-5", 1, "Linear", 30, 30),
    ]
    return pd.DataFrame(rows, columns=["id", "depth", "type", "params", "own_params"])


PICKS = {"logits": ["1-5"], "penultimate": ["1-4"], "blocks": ["1-2", "1-3"]}


def test_layer_choices_come_from_the_recorder() -> None:
    net = _Net()
    choices = layers.layer_choices(net, torch.zeros(1, 1, 6, 6))
    assert choices.picks == PICKS
    assert choices.ids[:6] == ["0-1", "1-1", "1-2", "2-1", "2-2", "1-3"]
    assert choices.names()["1-2"] == "block" and choices.pick("nothing") == []
    assert layers.default_selection(choices) == ["1-4", "1-5"]
    assert not net._forward_hooks and not net.fc._forward_hooks  # the trace left no hook
    shown = layers.display_table(choices.table)
    assert list(shown.columns) == layers.TABLE_COLUMNS
    assert shown.loc[shown["id"] == "2-1", "name"].item() == "\u2003block.conv"  # indented


def test_layer_options_and_default_layers() -> None:
    choices = LayerChoices(_table(), PICKS)
    table = choices.table
    assert layers.layer_options(table, "none") == []
    assert "1-4" not in layers.layer_options(table, "params")
    assert "0-1" not in layers.layer_options(table, "any")
    assert layers.default_layers(["1-4", "1-5"], choices, "params") == ["1-5"]
    assert layers.default_layers(["1-2", "1-4"], choices, "any", max_layers=1) == ["1-4"]
    assert layers.default_layers([], choices, "any") == ["1-4"]
    assert layers.default_layers([], choices, "params") == ["1-5"]  # gradients: the logits
    assert layers.default_layers(["1-4"], choices, "none") == []


def test_score_layers_follow_the_selection_until_edited() -> None:
    choices = LayerChoices(_table(), PICKS)
    state: dict = {"layers": ["1-2", "1-4"], "score_layers_src": {}}
    options = layers.sync_score_layers(state, "KNN", "any", None, choices)
    assert options == ["1-1", "1-2", "2-1", "1-3", "1-4", "1-5"]
    assert state["w.L.KNN"] == ["1-2", "1-4"]
    state["w.L.KNN"] = ["1-5"]  # the user's own choice sticks
    layers.sync_score_layers(state, "KNN", "any", None, choices)
    assert state["w.L.KNN"] == ["1-5"]
    state["layers"] = ["1-1"]  # until the Layers page selection changes
    layers.sync_score_layers(state, "KNN", "any", None, choices)
    assert state["w.L.KNN"] == ["1-1"]
    state["w.L.GradNorm"] = ["1-4"]  # invalid for "params" (no parameters): reset
    state["score_layers_src"]["GradNorm"] = ("1-1",)
    layers.sync_score_layers(state, "GradNorm", "params", 1, choices)
    assert state["w.L.GradNorm"] == ["1-1"]


def test_selection_state_changes() -> None:
    state: dict = {"layers": ["1-4", "9-9"], "layers_version": 0}
    assert layers.keep_known(state, ["1-1", "1-4"]) == ["1-4"] and state["layers"] == ["1-4"]
    layers.set_selection(state, ["1-5", "1-1", "1-5"])
    assert state["layers"] == ["1-5", "1-1"] == state["layers_ms"]
    assert layers.table_key(state) == "layer_table_1"
    state["layer_table_1"] = {"selection": {"rows": [3, 0, 17]}}  # table order; stale rows dropped
    layers.select_rows(state, ["1-1", "1-2", "1-3", "1-4"])
    assert state["layers"] == ["1-1", "1-4"] == state["layers_ms"]
    state["layers_ms"] = ["1-3"]
    layers.select_from_multiselect(state)
    assert state["layers"] == ["1-3"] and state["layers_version"] == 2
