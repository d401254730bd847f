"""The base layer: types and small helpers shared by the recorder, the engine, the scores and the
evaluation (imports nothing from ``ood_core``).

Conventions: a batch is ``(n, ...)``; a conformity is ``(n, n_classes)``, higher = more
in-distribution; ``act_norm`` p-norms are taken per sample over all non-batch dims.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

LayerId = tuple[int, int]
"""torchinfo's ``(depth, depth_index)`` of a layer; ``(0, 1)`` is the whole network."""

Features = dict[str, Tensor]
"""A score's per-sample features of a batch or a dataset: ``{name: tensor (n, ...)}``."""

Progress = Callable[[int, int], None]
"""``progress(done, total)``, counts in samples."""

StageProgress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: a stage label, then counts in samples."""


class Timed:
    """Context manager measuring wall time in seconds (``.seconds``)."""

    seconds: float = 0.0

    def __enter__(self) -> Timed:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0


def normalise_activation(a: Tensor, p: float | None) -> Tensor:
    """Divide each sample's activation by its p-norm over all non-batch dims (None: unchanged;
    an all-zero sample stays zero)."""
    if p is None:
        return a
    norms = a.flatten(1).norm(p=p, dim=1).clamp_min(torch.finfo(a.dtype).tiny)
    return a / norms.view(-1, *([1] * (a.ndim - 1)))


def predicted_confidence(logits: Tensor, conformity: Tensor) -> Tensor:
    """The conformity at the predicted class: ``conformity[i, argmax(logits[i])]`` -> ``(n,)``."""
    return conformity.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
