"""Per-sample feature vectors from layer activations, shared by the score families."""

from __future__ import annotations

import torch
from torch import Tensor


def pool_features(a: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Spatial mean of a 4-D ``(N, C, H, W)`` activation -> ``(N, C)``; any other shape flattened
    per sample -> ``(N, prod)``; cast to ``dtype``. (With ``H = W = 1`` both agree.)"""
    a = a.to(dtype)
    return a.mean(dim=(2, 3)) if a.ndim == 4 else a.flatten(1)
