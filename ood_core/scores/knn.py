"""Nearest-neighbour score on recorded features, with a faiss flat index."""

from __future__ import annotations

import faiss
import numpy as np
import torch
from torch import Tensor

from ood_core.core import normalise_activation
from ood_core.layer_ids import LayerId
from ood_core.params import Param
from ood_core.scores.base import BaseScore, Features
from ood_core.scores.registry import register_score

INDEX_METRIC = Param(
    "index_metric",
    "choice",
    "l2",
    choices=("l2", "ip"),
    help="l2: squared Euclidean distance; ip: inner product (cosine if normed).",
)


def flat_features(activations: dict[LayerId, Tensor], layers: tuple[LayerId, ...]) -> Tensor:
    """Concatenate the layers' activations flattened per sample -> float32 ``(batch, D)``."""
    return torch.cat([activations[layer].flatten(1).float() for layer in layers], dim=1)


def to_faiss(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)


def flat_index(calib: Tensor, metric: str) -> faiss.Index:
    """A faiss flat (exact) index over ``calib`` ``(n, D)``: L2 or inner product."""
    index = (
        faiss.IndexFlatL2(calib.shape[1]) if metric == "l2" else faiss.IndexFlatIP(calib.shape[1])
    )
    index.add(to_faiss(calib))
    return index


def check_k(owner: BaseScore, k: int, n_calib: int) -> None:
    if k > n_calib:
        raise ValueError(
            f"{owner!r}: k={k} neighbours but only {n_calib} calibration samples; "
            f"use k <= {n_calib} or more calibration data."
        )


@register_score
class KNN(BaseScore):
    """Deep nearest neighbours: conformity ``-d_k(x)``, the squared L2 distance from the (by
    default L2-normalised) features of ``x`` to its k-th nearest calibration sample (per sample);
    with ``index_metric='ip'`` the inner-product similarity to the k-th neighbour. Features: the
    recorded layers flattened per sample and concatenated (faiss float32 distances, as the
    reference library).

    ``act_norm`` (default 2) is applied by the engine to each layer before concatenation; the
    reference library normalises the concatenation instead, which only differs with several
    layers.

    Sun et al., "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022.
    """

    family = "neighbours"
    reference = "Sun et al., ICML 2022"
    layer_rule = "any"
    default_act_norm = 2.0
    params = (
        Param("k", "int", 15, low=1, required=True, help="Which neighbour (k-th) is used."),
        INDEX_METRIC,
    )

    normalises_concatenation = True

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        return {"x": normalise_activation(flat_features(activations, self.layers), self.act_norm)}

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        check_k(self, self.k, len(features["x"]))
        self.index = flat_index(features["x"], self.index_metric)

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        dist, _ = self.index.search(to_faiss(features["x"]), self.k)
        kth = torch.from_numpy(dist[:, -1].astype(np.float64)).to(logits.device)
        return -kth if self.index_metric == "l2" else kth


__all__ = ["KNN"]
