"""Layer choices: the network's layer table and quick picks (from :class:`ood_core.recorder.
Recorder`, the package's one head rule), what a score may read, per-score defaults derived from
the Layers page selection, and that selection's state changes."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from ood_core.layer_ids import layer_text
from ood_core.recorder import Recorder
from ood_core.scores import SCORES
from ood_lens_app.state import score_layer_key

TABLE_COLUMNS = ["id", "name", "type", "input_shape", "output_shape", "params", "params_pct"]
"""Columns of the layer table the Layers page shows."""


@dataclass(frozen=True)
class LayerChoices:
    """A network's layer table (``Recorder.layer_table``: ``id`` is ``"d-i"``), its quick
    picks as ``"d-i"`` ids (``logits``, ``penultimate``, ``blocks``: ``Recorder.quick_picks``)
    and, per registered score, the layers it accepts (``BaseScore.allowed_layers``: its own
    rules, e.g. ViM only on the checked head) and its defaults (``BaseScore.default_layers``)."""

    table: pd.DataFrame
    picks: dict[str, list[str]] = field(default_factory=dict)
    allowed: dict[str, list[str]] = field(default_factory=dict)
    defaults: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [str(i) for i in self.table["id"]]

    def names(self) -> dict[str, str]:
        """``{id: module name}``."""
        return dict(zip(self.ids, self.table["name"].astype(str), strict=True))

    def pick(self, key: str) -> list[str]:
        return list(self.picks.get(key, []))


def layer_choices(net: nn.Module, example: torch.Tensor) -> LayerChoices:
    """Trace ``net`` on ``example`` (a batch of one) once: its layer table, quick picks and
    every score's accepted and default layers."""
    recorder = Recorder(net, input_data=example)
    try:
        picks = {k: [layer_text(lid) for lid in v] for k, v in recorder.quick_picks().items()}
        allowed, defaults = {}, {}
        for name, cls in SCORES.items():
            if cls.layer_rule != "none":
                allowed[name] = [layer_text(lid) for lid in cls.allowed_layers(recorder)]
                defaults[name] = [layer_text(lid) for lid in cls.default_layers(recorder)]
        return LayerChoices(recorder.layer_table(), picks, allowed, defaults)
    finally:
        recorder.close()


def default_selection(choices: LayerChoices) -> list[str]:
    """The selection after a model or data change: penultimate features and logits."""
    return list(dict.fromkeys(choices.pick("penultimate") + choices.pick("logits")))


def layer_options(table: pd.DataFrame, rule: str) -> list[str]:
    """Layer ids a score with ``layer_rule`` ``rule`` may use: none for ``"none"``; layers
    holding parameters (their own or their children's, what gradients can be taken of) for
    ``"params"``; every layer but the whole network for ``"any"``."""
    if rule == "none":
        return []
    rows = table[table["depth"] > 0]
    if rule == "params":
        rows = rows[rows["params"] > 0]
    return [str(i) for i in rows["id"]]


def default_layers(
    selected: Sequence[str],
    choices: LayerChoices,
    rule: str,
    max_layers: int | None = None,
    name: str | None = None,
) -> list[str]:
    """The Layers page selection filtered for a score: the layers score ``name`` accepts
    (``choices.allowed``; without a name, those its ``rule`` allows), at most ``max_layers``
    (keeping the last ones, the deepest features). If nothing is left, the score's own default
    layers (``choices.defaults``), else the first quick pick (penultimate features, then logits;
    logits only for ``"params"``) the rule allows."""
    allowed = score_options(choices, rule, name)
    if not allowed:
        return []
    keep = [lid for lid in selected if lid in allowed]
    if not keep and name in choices.defaults:
        keep = [lid for lid in choices.defaults[name] if lid in allowed]
    if not keep:
        fallback = ([] if rule == "params" else choices.pick("penultimate")) + choices.pick(
            "logits"
        )
        keep = [lid for lid in fallback if lid in allowed][:1]
    if max_layers is not None:
        keep = keep[-max_layers:]
    return keep


def score_options(choices: LayerChoices, rule: str, name: str | None = None) -> list[str]:
    """The layers score ``name`` accepts on this network (its own rules), or, for a name
    ``choices`` does not know, those its ``layer_rule`` allows (:func:`layer_options`)."""
    if name is not None and name in choices.allowed:
        return list(choices.allowed[name])
    return layer_options(choices.table, rule)


def sync_score_layers(
    state: MutableMapping[str, Any],
    name: str,
    rule: str,
    max_layers: int | None,
    choices: LayerChoices,
) -> list[str]:
    """Keep score ``name``'s layer choice in step with the Layers page: when the selection
    changed since the score's layers were set (or they are invalid for this network), reset them
    to the selection filtered by the score's rule. Returns the layers the score may use."""
    options = score_options(choices, rule, name)
    key = score_layer_key(name)
    src = state.setdefault("score_layers_src", {})
    current = tuple(state["layers"])
    stored = state.get(key)
    invalid = stored is None or any(lid not in options for lid in stored)
    if src.get(name) != current or invalid:
        state[key] = default_layers(state["layers"], choices, rule, max_layers, name)
        src[name] = current
    return options


# ---------------------------------------------------------------------------- the selection
def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The Layers page's table: :data:`TABLE_COLUMNS`, names indented by depth."""
    shown = table[TABLE_COLUMNS].copy()
    indent = table["depth"].clip(lower=0).map(lambda d: "\u2003" * max(0, d - 1))
    shown["name"] = indent + shown["name"]
    return shown


DEPTHS_KEY = "layers_depths"
"""State key of the layer table's depth filter (no depth chosen: every depth)."""
SELECTED_ONLY_KEY = "layers_selected_only"
"""State key of the layer table's "selected only" toggle."""
ID_NOTATION = "depth-index, e.g. 1-11 (torchinfo's (depth, index) written d-i)"
"""How the dashboard writes a layer id (table, widgets, sidebar, run configs)."""


def table_depths(table: pd.DataFrame) -> list[int]:
    """The depths present in a layer table, ascending (the depth filter's options)."""
    return sorted(int(d) for d in table["depth"].unique())


def filter_table(
    table: pd.DataFrame,
    depths: Sequence[int] = (),
    selected: Sequence[str] = (),
    selected_only: bool = False,
) -> pd.DataFrame:
    """Rows of ``table`` at ``depths`` (none given: all) and, with ``selected_only``, among the
    ``selected`` ids; the index is reset (row positions are what the table's selection holds)."""
    keep = pd.Series(True, index=table.index)
    if depths:
        keep &= table["depth"].isin([int(d) for d in depths])
    if selected_only:
        keep &= table["id"].astype(str).isin(list(selected))
    return table[keep].reset_index(drop=True)


def rebuild_table(state: MutableMapping[str, Any]) -> None:
    """A filter changed: a new table key, so the table is redrawn with the selection ticked."""
    state["layers_version"] += 1


def table_key(state: MutableMapping[str, Any]) -> str:
    """Widget key of the layer table; a new key rebuilds the table with a new selection."""
    return f"layer_table_{state['layers_version']}"


def set_selection(state: MutableMapping[str, Any], layers: Sequence[str]) -> None:
    """A selection made in code (quick picks, a new model): stored, and the table rebuilt."""
    state["layers"] = list(dict.fromkeys(layers))
    state["layers_version"] += 1
    state["layers_ms"] = list(state["layers"])


def select_rows(
    state: MutableMapping[str, Any], ids: Sequence[str], order: Sequence[str] | None = None
) -> None:
    """The table's row selection (its widget state) became the selection, in table order.

    ``ids`` are the rows shown (a filtered table); selected layers it hides stay selected;
    ``order`` (default ``ids``) is the whole table's. With "selected only" on, the table is
    rebuilt (the rows it shows change with the selection)."""
    widget = state.get(table_key(state))
    rows = list(widget["selection"]["rows"]) if widget else []
    picked = [ids[r] for r in sorted(rows) if 0 <= r < len(ids)]
    if order is None:
        state["layers"] = picked
    else:
        chosen = set(picked) | {lid for lid in state["layers"] if lid not in ids}
        state["layers"] = [lid for lid in order if lid in chosen]
    state["layers_ms"] = list(state["layers"])
    if state.get(SELECTED_ONLY_KEY):
        state["layers_version"] += 1


def select_from_multiselect(state: MutableMapping[str, Any]) -> None:
    """The multiselect's value became the selection; the table is rebuilt to show it."""
    state["layers"] = list(state["layers_ms"])
    state["layers_version"] += 1


def keep_known(state: MutableMapping[str, Any], ids: Sequence[str]) -> list[str]:
    """Drop selected ids this network does not have; returns the selection."""
    stored = [lid for lid in state["layers"] if lid in ids]
    if stored != state["layers"]:
        state["layers"] = stored
    return stored
