"""RankFeat: remove the dominant rank-1 component of a feature map, then finish the forward pass."""

from __future__ import annotations

from math import prod

import torch
from torch import Tensor

from ood_core.layer_ids import layer_text
from ood_core.params import Param
from ood_core.recorder import LayerId, Recorder
from ood_core.scores.base import BaseScore, Features
from ood_core.scores.registry import register_score


def remove_rank1(a: Tensor) -> Tensor:
    """Subtract each sample's top singular component: ``X - s1 u1 v1^T`` with ``X`` the sample's
    ``(C, H*W)`` matrix (float64 SVD), returned in ``a``'s shape and dtype."""
    x = a.double().reshape(a.shape[0], a.shape[1], -1)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    top = s[:, :1, None] * u[:, :, :1] @ vh[:, :1, :]
    return (x - top).reshape(a.shape).to(a.dtype)


@register_score
class RankFeat(BaseScore):
    """RankFeat: at each chosen layer (a feature map ``(N, C, H, W)`` or ``(N, C, L)``), remove the
    rank-1 component of every sample's ``(C, H*W)`` matrix, run the rest of the network on it
    and take the energy ``logsumexp(f')`` of the resulting logits; with several layers (the
    paper's "Block 3 + 4"), conformity is the mean of the per-layer energies (per sample; higher =
    more in-distribution). One extra forward pass per layer (exact SVD, not power iteration).

    Song, Sebe & Wang, "RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection",
    NeurIPS 2022.
    """

    family = "activation shaping"
    reference = "Song, Sebe & Wang, NeurIPS 2022"
    needs_fit = False
    layer_rule = "any"
    own_pass = True
    suggested_layers = ("last_block",)
    params = (
        Param(
            "temperature",
            "float",
            1.0,
            low=0,
            low_exclusive=True,
            help="Temperature T of the energy T logsumexp(f'/T).",
        ),
    )

    def check_layers(
        self, layers: tuple[LayerId, ...], recorder: Recorder | None = None
    ) -> tuple[LayerId, ...]:
        layers = super().check_layers(layers, recorder)
        if recorder is not None:
            for layer in layers:
                info = recorder.info(layer)
                if info.n_calls != 1:
                    raise ValueError(
                        f"RankFeat: layer {layer_text(layer)} ({recorder.layer_name(layer)}) is "
                        "called more than once per forward pass; pick another."
                    )
                if not info.output_size or len(info.output_size) < 3:
                    raise ValueError(
                        f"RankFeat needs a feature map (N, C, H, W) or (N, C, L); layer {layer_text(layer)} "
                        f"({recorder.layer_name(layer)}) outputs {info.output_size}. Pick a block."
                    )
                if prod(info.output_size[2:]) == 1:
                    raise ValueError(
                        f"RankFeat @ {layer_text(layer)} ({recorder.layer_name(layer)}): the "
                        f"feature map {info.output_size} is 1x1, so each sample's (C, H*W) matrix "
                        "is one column and removing its rank-1 part leaves zero (one constant "
                        "confidence). Pick an earlier block with a spatial map."
                    )
        return layers

    def extract_own(self, recorder: Recorder, x: Tensor) -> Features:
        energies = []
        t = self.temperature
        for layer in self.layers:
            module = recorder.info(layer).module
            handle = module.register_forward_hook(lambda m, args, out: remove_rank1(out))
            try:
                with torch.no_grad():
                    logits = recorder.net(x.clone())  # a network may edit its input
            finally:
                handle.remove()
            energies.append(t * torch.logsumexp(logits.double() / t, dim=1))
        return {"energy": torch.stack(energies, 1).mean(1)}

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        return features["energy"]


__all__ = ["RankFeat"]
