"""Layer ids: torchinfo's ``(depth, depth_index)`` pairs, their one written form and its parser.

In code a layer id is a tuple ``(1, 11)``; written down (tables, widgets, CSV, reports, messages,
configs) it is torchinfo's own ``"1-11"``, the form its summary prints. Every entry point reads
``"1-11"``, ``"(1, 11)"``, ``[1, 11]`` and ``(1, 11)``. Imports nothing (not even torch), so the
CLI can use it before loading any model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

LayerId = tuple[int, int]
"""torchinfo's ``(depth, depth_index)`` of a layer; ``(0, 1)`` is the whole network."""


def layer_text(layer: Sequence[int]) -> str:
    """The one written form of a layer id: ``(1, 11)`` -> ``"1-11"``."""
    return f"{int(layer[0])}-{int(layer[1])}"


def layers_text(layers: Iterable[Sequence[int]]) -> str:
    """``[(1, 5), (1, 11)]`` -> ``"1-5, 1-11"``."""
    return ", ".join(layer_text(lid) for lid in layers)


def parse_layer_id(layer: Any) -> LayerId:
    """``"1-11"``, ``"(1, 11)"``, ``[1, 11]`` or ``(1, 11)`` -> ``(1, 11)``; ``ValueError`` otherwise."""
    if isinstance(layer, str):
        parts = [p.strip() for p in layer.strip("() ").replace("-", ",").split(",")]
        if all(p.isdigit() for p in parts):
            layer = tuple(int(p) for p in parts)
    if (
        not isinstance(layer, Sequence)
        or len(layer) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in layer)
    ):
        raise ValueError(
            f'A layer id is a (depth, index) pair like "1-5" or (1, 5); got {layer!r}.'
        )
    return (int(layer[0]), int(layer[1]))


def parse_layer_ids(layers: Iterable[Any]) -> list[LayerId]:
    """:func:`parse_layer_id` over an iterable."""
    return [parse_layer_id(layer) for layer in layers]
