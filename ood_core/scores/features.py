"""Per-sample feature vectors from layer activations: the poolings the scores share.

Layouts. A recorded activation is read by its number of dims (batch first):

* 4-D ``(N, C, H, W)``: a convolutional feature map (``C`` channels on an ``H x W`` grid);
* 3-D ``(N, L, D)``: a sequence of ``L`` tokens of ``D`` features, the layout of timm / ViT /
  DeiT blocks (e.g. ``(N, 65, 192)``: the CLS token at index 0 and 64 patch tokens; DeiT-distilled
  models put a distillation token at index 1). A ``Conv1d``-style ``(N, C, L)`` output is read
  the same way, so its "tokens" are its channels;
* 2-D ``(N, D)``: features (penultimate layer, logits); any other shape is only flattened.

Poolings (:data:`POOLINGS`, the ``pooling`` parameter of the KNN, neighbour and Mahalanobis
scores):

* ``flatten``: the whole activation per sample, ``(N, prod)`` (the reference library's);
* ``mean``: a 4-D map averaged over ``H, W`` -> ``(N, C)``; 3-D tokens averaged over the ``L``
  tokens -> ``(N, D)``; any other shape flattened (it changes nothing there);
* ``cls``: 3-D tokens: token 0 (the class token) -> ``(N, D)``; any other shape flattened (so a
  token block and the pooled 2-D feature can be read together).

:func:`check_pooling` refuses, before any forward pass, ``cls`` when no chosen layer is 3-D or
one is a 4-D map, and a
``mean`` the user chose (a value other than the score's default) that changes nothing on every
chosen layer (2-D outputs, 4-D maps with ``H = W = 1``, a single token). :func:`pooled_size` gives
the feature size the memory estimates use, and :func:`pooling_remedy` the pooling a warning or a
refusal may suggest for a layer's shape (never the pooling in use, nothing for a 2-D output).

:func:`pool_features` is the fixed pooling of the activation-shaping scores: it must reproduce the
head's input through global average pooling, so it averages 4-D maps over space and flattens
everything else, 3-D outputs included.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ood_core.budget import per_sample_numel
from ood_core.layer_ids import LayerId, layer_text
from ood_core.params import Param

POOLINGS = ("flatten", "mean", "cls")
"""The poolings of a layer's activation into one feature vector per sample (module doc)."""

POOLING_HELP = (
    "Layer features. flatten: the whole activation per sample (the reference's); mean: a 4-D "
    "(N, C, H, W) map averaged over H, W -> (N, C), 3-D (N, L, D) tokens (ViT / DeiT blocks) "
    "averaged over the L tokens -> (N, D); cls: token 0 of 3-D (N, L, D) tokens -> (N, D)."
)


def pooling_param(default: str = "flatten", help: str = POOLING_HELP) -> Param:
    """The ``pooling`` parameter (one of :data:`POOLINGS`) with ``default``."""
    return Param("pooling", "choice", default, choices=POOLINGS, help=help)


def pool_features(a: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Spatial mean of a 4-D ``(N, C, H, W)`` activation -> ``(N, C)``; any other shape flattened
    per sample -> ``(N, prod)`` (3-D included: this is the activation-shaping scores' pooling,
    which must reproduce the head's input); cast to ``dtype``. (With ``H = W = 1`` both agree.)"""
    a = a.to(dtype)
    return a.mean(dim=(2, 3)) if a.ndim == 4 else a.flatten(1)  # noqa: PLR2004


def pool(a: Tensor, pooling: str = "flatten", dtype: torch.dtype | None = None) -> Tensor:
    """``(N, D)`` features of an activation ``a`` by ``pooling`` (see the module doc), cast to
    ``dtype`` (default: ``a``'s own) before averaging."""
    if dtype is not None:
        a = a.to(dtype)
    if pooling == "flatten":
        return a.flatten(1)
    if pooling == "mean":
        if a.ndim == 4:  # noqa: PLR2004
            return a.mean(dim=(2, 3))
        return a.mean(dim=1) if a.ndim == 3 else a.flatten(1)  # noqa: PLR2004
    if pooling == "cls":
        return a[:, 0] if a.ndim == 3 else a.flatten(1)  # noqa: PLR2004
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")


# ---------------------------------------------------------------------------- shapes
def _dims(output_size: Any) -> tuple[int, ...] | None:
    """A layer-table ``output_size`` (batch first) as a flat tuple, None for a tuple output."""
    items = tuple(output_size or ())
    return items if items and all(isinstance(s, int) for s in items) else None


def layout(output_size: Any) -> str:
    """``'map'`` (4-D, ``H W > 1``), ``'tokens'`` (3-D, ``L > 1``) or ``'flat'`` (anything that
    ``mean`` does not shrink: 2-D, ``H = W = 1``, one token, other shapes)."""
    dims = _dims(output_size)
    if dims is not None and len(dims) == 4 and dims[2] * dims[3] > 1:  # noqa: PLR2004
        return "map"
    if dims is not None and len(dims) == 3 and dims[1] > 1:  # noqa: PLR2004
        return "tokens"
    return "flat"


def pooled_size(output_size: Any, pooling: str = "flatten") -> int:
    """Features per sample of a layer whose ``output_size`` (batch first, as the layer table
    gives it) is pooled by ``pooling``: ``C`` for ``mean`` on ``(N, C, H, W)``, ``D`` for
    ``mean`` / ``cls`` on ``(N, L, D)``, else every value."""
    dims = _dims(output_size)
    if dims is not None and pooling in ("mean", "cls"):
        if len(dims) == 3:  # noqa: PLR2004
            return int(dims[2])
        if len(dims) == 4 and pooling == "mean":  # noqa: PLR2004
            return int(dims[1])
    return per_sample_numel(output_size)


def shape_text(output_size: Any) -> str:
    """``'(N, 65, 192)'``: a layer's output shape with its batch dimension written ``N``."""
    dims = _dims(output_size)
    if dims is None:
        return str(tuple(output_size or ()))
    return "(" + ", ".join(["N", *(str(d) for d in dims[1:])]) + ")"


def _describe(recorder: Any, layers: Iterable[LayerId]) -> str:
    """``'1-3 (blocks.0, output (N, 65, 192))'`` for each layer, joined."""
    parts = []
    for layer in layers:
        info = recorder.info(layer)
        name = recorder.layer_name(layer) or type(recorder.net).__name__
        parts.append(f"{layer_text(layer)} ({name}, output {shape_text(info.output_size)})")
    return ", ".join(parts)


# ---------------------------------------------------------------------------- checks, remedies
def check_pooling(
    owner: Any, recorder: Any, layers: Sequence[LayerId], pooling: str, default: str
) -> None:
    """Refuse (ValueError naming the score, the layers, their output shapes and the fix) a
    pooling that does not apply or does nothing, before any forward pass:

    * ``cls`` when no chosen layer is 3-D ``(N, L, D)`` tokens (it would change nothing), or on a
      4-D map (use ``mean`` there); 2-D layers beside token layers are read whole;
    * ``mean`` chosen by the user (``pooling != default``) when it changes nothing on every chosen
      layer (2-D outputs, 4-D maps with ``H = W = 1``, a single token). A default ``mean`` (e.g.
      MultiMahalanobis, NNGuide) is never refused: it is ``flatten`` there.
    """
    if recorder is None or not layers:
        return
    sizes = {layer: recorder.info(layer).output_size for layer in layers}
    if pooling == "cls":
        bad = [lay for lay, size in sizes.items() if len(_dims(size) or ()) != 3]  # noqa: PLR2004
        maps = [lay for lay in bad if layout(sizes[lay]) == "map"]
        if maps or len(bad) == len(sizes):
            bad = maps or bad
            fix = (
                "use pooling='mean' (a 4-D map averaged over H, W) or a token layer"
                if maps
                else f"use pooling={default!r} or a token layer"
            )
            verb = "is" if len(bad) == 1 else "are"
            raise ValueError(
                f"{owner!r}: pooling='cls' takes token 0 of a 3-D (N, L, D) token output (ViT / "
                f"DeiT blocks), but {_describe(recorder, bad)} {verb} not 3-D; {fix}."
            )
    elif (
        pooling == "mean"
        and pooling != default
        and all(layout(size) == "flat" for size in sizes.values())
    ):
        them = "this layer does" if len(sizes) == 1 else "these layers do"
        raise ValueError(
            f"{owner!r}: pooling='mean' changes nothing on {_describe(recorder, sizes)}: it "
            "averages 4-D (N, C, H, W) maps over H, W and 3-D (N, L, D) tokens over L, which "
            f"{them} not have (the features are those of pooling='flatten'); use "
            "pooling='flatten' or choose a feature map or token layer."
        )


def check_score_pooling(score: Any, recorder: Any, layers: Sequence[LayerId]) -> None:
    """:func:`check_pooling` of a score's ``pooling`` value against its declared default (no-op
    for a score without a ``pooling`` parameter or without a recorder)."""
    values = getattr(score, "values", {})
    if "pooling" not in values:
        return
    default = next(p.default for p in score.all_params() if p.name == "pooling")
    check_pooling(score, recorder, layers, values["pooling"], default)


def pooling_remedy(output_sizes: Iterable[Any], pooling: str, offered: bool = True) -> str | None:
    """The pooling that would give fewer feature dims for layers of these ``output_sizes``
    under ``pooling`` (the one in use, never suggested again), as remedy text, or None:
    ``"pooling='mean' (fewer dims)"`` when one is a 4-D map with ``H W > 1``, ``"pooling='cls'
    or pooling='mean' (over tokens, fewer dims)"`` for 3-D tokens, nothing for 2-D outputs or a
    score without a pooling parameter (``offered=False``)."""
    if not offered or pooling != "flatten":
        return None
    kinds = {layout(size) for size in output_sizes}
    if "map" in kinds:
        return "pooling='mean' (fewer dims)"
    if "tokens" in kinds:
        return "pooling='cls' or pooling='mean' (over tokens, fewer dims)"
    return None


def owner_pooling_remedy(owner: Any, layers: Sequence[LayerId] | None = None) -> str | None:
    """:func:`pooling_remedy` for a bound score: its recorder's output sizes of ``layers``
    (default: its layers) under its ``pooling`` (None without one, or unbound)."""
    rec = getattr(owner, "recorder_", None)
    values = getattr(owner, "values", {})
    if rec is None or "pooling" not in values:
        return None
    layers = tuple(owner.layers if layers is None else layers)
    return pooling_remedy((rec.info(lay).output_size for lay in layers), values["pooling"])


def join_remedies(*parts: str | None) -> str:
    """The non-empty ``parts`` as one remedy: ``'a'``, ``'a or b'``, ``'a, b or c'``."""
    items = [p for p in parts if p]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


def feature_dims(recorder: Any, layers: Iterable[LayerId], pooling: str = "flatten") -> int:
    """Length of the per-sample feature vector of ``layers`` concatenated, each pooled by
    ``pooling`` (:func:`pooled_size`)."""
    return sum(pooled_size(recorder.info(layer).output_size, pooling) for layer in layers)


__all__ = [
    "POOLINGS",
    "POOLING_HELP",
    "check_pooling",
    "check_score_pooling",
    "feature_dims",
    "join_remedies",
    "layout",
    "owner_pooling_remedy",
    "pool",
    "pool_features",
    "pooled_size",
    "pooling_param",
    "pooling_remedy",
    "shape_text",
]
