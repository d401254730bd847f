"""Small tensor helpers shared by the engine and the scores (imports nothing from ``ood_core``).

Conventions: a batch is ``(n, ...)``; a conformity is ``(n, n_classes)``, higher = more
in-distribution; ``act_norm`` p-norms are taken per sample over all non-batch dims.
"""

from __future__ import annotations

import torch
from torch import Tensor

LayerId = tuple[int, int]
"""torchinfo's ``(depth, depth_index)`` of a layer; ``(0, 1)`` is the whole network."""


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
