"""Nearest-neighbour score on recorded features, with a faiss flat index.

Features are pooled per layer (``pooling``, :mod:`ood_core.scores.features`: ``flatten`` by
default, as the reference library; ``mean`` / ``cls`` for 4-D maps and 3-D ViT tokens) and
concatenated. The float32 feature bank and every neighbour search are estimated before they are
computed (:func:`check_bank`, :func:`check_search`), with remedies that fit the layers' shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
import torch
from torch import Tensor

import ood_core.scores.features as feat
from ood_core.budget import check_budget, net_device_dtype
from ood_core.core import normalise_activation
from ood_core.layer_ids import LayerId
from ood_core.params import Param
from ood_core.recorder import Recorder
from ood_core.scores.base import BaseScore, Features
from ood_core.scores.registry import register_score

SEARCH_CHUNK = 1024
"""Queries per block when exact float64 distances are recomputed from the neighbours' features
(see :func:`ood_core.scores.neighbours.search`)."""

INDEX_METRIC = Param(
    "index_metric",
    "choice",
    "l2",
    choices=("l2", "ip"),
    help="l2: squared Euclidean distance; ip: inner product (cosine if normed).",
)


POOLING = feat.pooling_param(
    "flatten",
    "Layer features (each layer, before concatenation). flatten: the whole activation per "
    "sample (the reference's); mean: a 4-D (N, C, H, W) map averaged over H, W -> (N, C), 3-D "
    "(N, L, D) tokens (ViT / DeiT blocks) averaged over the L tokens -> (N, D); cls: token 0 of "
    "3-D (N, L, D) tokens -> (N, D).",
)
"""The ``pooling`` parameter of KNN and the neighbour scores (default ``flatten``)."""


def flat_features(
    activations: dict[LayerId, Tensor], layers: tuple[LayerId, ...], pooling: str = "flatten"
) -> Tensor:
    """Concatenate the layers' activations pooled per sample (:func:`~ood_core.scores.features.
    pool`; default flattened) -> float32 ``(batch, D)``."""
    return torch.cat(
        [feat.pool(activations[layer], pooling, torch.float32) for layer in layers], dim=1
    )


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


def feature_dims(recorder: Recorder, layers: Sequence[LayerId], pooling: str = "flatten") -> int:
    """Length of the per-sample feature vector of ``layers`` concatenated, each pooled by
    ``pooling`` (:func:`ood_core.scores.features.pooled_size`: e.g. ``D`` for ``mean`` or
    ``cls`` on ``(N, L, D)`` tokens)."""
    return feat.feature_dims(recorder, layers, pooling)


def check_bank(owner: BaseScore, n_samples: int, dims: int, copies: int = 2) -> None:
    """Refuse (:class:`~ood_core.budget.BudgetError`) a float32 feature bank of ``n_samples x
    dims`` kept ``copies`` times (the extracted features and the faiss index) that cannot fit;
    the remedy names the pooling that would shrink the owner's layers, when one would."""
    rec = owner.recorder_
    device = net_device_dtype(rec.net)[0] if rec is not None else None
    remedy = feat.join_remedies(
        feat.owner_pooling_remedy(owner), "smaller or fewer layers", "fewer calibration samples"
    )
    check_budget(
        f"{owner!r}: the feature bank of {n_samples:,} calibration samples x {dims:,} dims "
        f"(x{copies}: features and index)",
        4 * n_samples * dims * copies,
        "use " + remedy,
        device,
    )


def check_search(
    owner: BaseScore,
    n_query: int,
    k: int,
    *,
    dims: int = 0,
    exact: bool = False,
    n_classes: int = 0,
) -> None:
    """Refuse a search of the ``k`` nearest neighbours of ``n_query`` queries that cannot fit:
    faiss' ``(n_query, k)`` distances and ids and their float64 / int64 copies (28 bytes per
    neighbour), with ``exact`` the float64 ``(chunk, k, dims)`` neighbour features gathered to
    recompute exact distances, and with ``n_classes`` the ``(n_query, k, C)`` one-hot labels
    of the neighbours (int64). Neighbour searches run on the CPU."""
    n_bytes = 28 * n_query * k
    if exact:
        n_bytes += 3 * 8 * min(n_query, SEARCH_CHUNK) * k * dims
    if n_classes:
        n_bytes += 8 * n_query * k * n_classes
    pooling = feat.owner_pooling_remedy(owner) if exact else None
    check_budget(
        f"{owner!r}: the search of the k={k:,} nearest neighbours of {n_query:,} samples",
        n_bytes,
        "lower k"
        + (f" or use {pooling}" if pooling else "")
        + (" or score fewer samples per call" if n_query > k else ""),
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
        POOLING,
    )

    normalises_concatenation = True

    def check_layers(
        self, layers: Sequence[LayerId], recorder: Recorder | None = None
    ) -> tuple[LayerId, ...]:
        layers = super().check_layers(layers, recorder)
        feat.check_score_pooling(self, recorder, layers)
        return layers

    def check_calibration(self, n_samples: int, class_counts: list[int] | None = None) -> None:
        super().check_calibration(n_samples, class_counts)
        if self.recorder_ is not None and self.layers:
            check_bank(self, n_samples, feature_dims(self.recorder_, self.layers, self.pooling))

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        x = flat_features(activations, self.layers, self.pooling)
        return {"x": normalise_activation(x, self.act_norm)}

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        check_k(self, self.k, len(features["x"]))
        self.index = flat_index(features["x"], self.index_metric)

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        check_search(self, len(features["x"]), self.k)
        dist, _ = self.index.search(to_faiss(features["x"]), self.k)
        kth = torch.from_numpy(dist[:, -1].astype(np.float64)).to(logits.device)
        return -kth if self.index_metric == "l2" else kth


__all__ = ["KNN", "POOLING"]
