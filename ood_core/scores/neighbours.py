"""Neighbour-based scores on one or several layers: DkNN, LID, Trust, NNGuide and JTLA.

Every score here searches exact (flat) faiss indexes (the search helpers shared with :mod:`.knn`
are in :mod:`ood_core.scores.search`).

Features: as in the reference library, each layer's activations are flattened per sample
(``pooling='flatten'``, the default). ``pooling='mean'`` averages a 4-D ``(N, C, H, W)`` map over
``H, W`` to ``(N, C)`` and 3-D ``(N, L, D)`` ViT tokens over the ``L`` tokens to ``(N, D)``;
``pooling='cls'`` keeps token 0 of 3-D tokens (:mod:`ood_core.scores.features`). NNGuide pools by
default (``pooling='mean'``). LID and Trust read one feature space (the layers concatenated);
DkNN and JTLA keep one index per layer.

Neighbour *labels* (DkNN, JTLA) are read in faiss' own order, so that ties and the exclusion of a
calibration sample from its own neighbours select exactly the neighbours the reference library
selects. Neighbour *distances* (LID, Trust) are recomputed exactly in float64 from the stored
calibration features (faiss' float32 ``|x|^2 + |y|^2 - 2 x.y`` loses small distances).
"""

from __future__ import annotations

import ast
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import ood_core.scores.features as feat
from ood_core.budget import check_budget, per_sample_numel
from ood_core.core import normalise_activation
from ood_core.diagnostics import degenerate
from ood_core.layer_ids import LayerId
from ood_core.params import Param
from ood_core.recorder import Recorder
from ood_core.scores.aggregation import AGGREGATIONS, AggregationParam, aggregate
from ood_core.scores.base import BaseScore, Features
from ood_core.scores.labels import UsesLabels
from ood_core.scores.registry import register_score
from ood_core.scores.search import (
    INDEX_METRIC,
    POOLING,
    check_bank,
    check_k,
    check_search,
    faiss_search,
    feature_dims,
    flat_features,
    flat_index,
    search,
    search_loo,
    self_query_search,
)

JTLA_MAX_CLASSES = 100_000
"""Largest ``n_classes_hint``: JTLA keeps a ``(C, C)`` table of expected class counts per layer
and label group and ``(C, n, C)`` test terms, so 100,000 classes already need 80 GB per table;
the memory of a fit is also estimated before it starts."""

NNGUIDE_POOLING = feat.pooling_param(
    "mean",
    "Layer features (default mean, the paper's global average pooling): mean: a 4-D (N, C, H, "
    "W) map averaged over H, W -> (N, C), 3-D (N, L, D) tokens (ViT / DeiT blocks) averaged over "
    "the L tokens -> (N, D); cls: token 0 of 3-D tokens -> (N, D); flatten: the whole "
    "activation per sample.",
)


# ---------------------------------------------------------------------------- helpers
def layer_features(
    activations: dict[LayerId, Tensor], layers: tuple[LayerId, ...], pooling: str = "flatten"
) -> dict[LayerId, Tensor]:
    """Float32 ``(N, D)`` features per layer, in order, pooled by ``pooling``
    (:func:`~ood_core.scores.features.pool`: flattened, ``mean`` over space or tokens, ``cls``
    token)."""
    return {layer: feat.pool(activations[layer], pooling, torch.float32) for layer in layers}


def pooled_features(
    activations: dict[LayerId, Tensor], layers: tuple[LayerId, ...]
) -> dict[LayerId, Tensor]:
    """``{layer: pool(activations[layer], 'mean', torch.float32)}`` for ``layers``, in order
    (4-D maps averaged over space, 3-D tokens over tokens)."""
    return layer_features(activations, layers, "mean")


def layer_key(layer: LayerId) -> str:
    return f"{layer[0]}-{layer[1]}"


def label_counts(labels: Tensor, idx: Tensor, n_classes: int) -> Tensor:
    """Class histogram ``(n, n_classes)`` (float64) of the neighbours ``idx`` ``(n, k)``."""
    return F.one_hot(labels[idx], n_classes).sum(1).double()


def class_counts(labels: Tensor, n_classes: int) -> Tensor:
    return torch.bincount(labels, minlength=n_classes)


def warn_missing_classes(
    owner: BaseScore,
    labels: Tensor,
    n_classes: int,
    consequence: str,
    what: str = "calibration sample",
) -> list[int]:
    """Warn (``OodLensWarning``) about the classes of ``range(n_classes)`` absent from ``labels``;
    return them."""
    missing = [c for c, n in enumerate(class_counts(labels, n_classes).tolist()) if n == 0]
    if missing:
        degenerate(
            owner,
            f"class(es) {missing} have no {what}: {consequence}",
            "give calibration samples of every class",
            stacklevel=3,
        )
    return missing


class _NeighbourScore(BaseScore):
    family = "neighbours"
    layer_rule = "any"

    def check_layers(
        self, layers: Sequence[LayerId], recorder: Recorder | None = None
    ) -> tuple[LayerId, ...]:
        """Also refuses (before any forward pass) a pooling that does not apply to the layers or
        does nothing on them (:func:`~ood_core.scores.features.check_pooling`)."""
        layers = super().check_layers(layers, recorder)
        feat.check_score_pooling(self, recorder, layers)
        return layers

    def check_calibration(self, n_samples: int, class_counts: list[int] | None = None) -> None:
        """Also refuses, before any forward pass, a feature bank that cannot fit in memory."""
        super().check_calibration(n_samples, class_counts)
        if self.recorder_ is not None and self.layers:
            check_bank(self, n_samples, feature_dims(self.recorder_, self.layers, self.pooling))

    def _features(self, activations: dict[LayerId, Tensor]) -> dict[LayerId, Tensor]:
        return layer_features(activations, self.layers, self.pooling)

    def _concat(self, activations: dict[LayerId, Tensor]) -> Tensor:
        """The layers' features concatenated ``(N, D)``; for scores that set
        ``normalises_concatenation`` (as the reference's ``concatenate=True``), ``act_norm``
        divides the whole concatenated vector, not each layer."""
        x = flat_features(self._features(activations), self.layers)
        return normalise_activation(x, self.act_norm) if self.normalises_concatenation else x

    def _per_layer(self, activations: dict[LayerId, Tensor]) -> Features:
        return {layer_key(lay): v for lay, v in self._features(activations).items()}


K_HELP = "Number k of nearest calibration neighbours."


# ---------------------------------------------------------------------------- DkNN
@register_score
class DkNN(UsesLabels, _NeighbourScore):
    """Deep k-nearest neighbours (per class), as the reference library computes it. One index per
    layer; ``n_l(x, c)`` = how many of the k nearest calibration samples of ``x`` in layer ``l``
    are labelled ``c``.

    * ``per_class=per_layer=False``: conformity for class ``c`` = ``sum_l n_l(x, c)`` (the raw
      neighbour label count over all layers; no calibration statistics).
    * Otherwise calibration computes, for every calibration sample ``j``, how many of its k
      nearest *other* calibration samples share its label (``a_j``; summed over layers, or one
      ``a_lj`` per layer with ``per_layer=True``). The conformity of class ``c`` in a layer (or
      the summed layers) is the left quantile ``#{j: a_j < n(x, c)} / #{j}`` over all calibration
      samples, or with ``per_class=True`` over those labelled ``c`` only (0 for a class without
      calibration samples). With ``per_layer=True`` the per-layer quantiles are combined with
      ``aggregation`` (a name of :data:`AGGREGATIONS`, e.g. ``fisher`` = sum of logs, or a float
      ``p``: their p-norm).

    Papernot & McDaniel's nonconformity is ``alpha = k L - sum_l n_l(x, c)`` and their p-value
    counts the calibration samples with ``a_j <= n(x, c)``; the reference library (and so this
    score) counts ``a_j < n(x, c)``, with the calibration set as their held-out split (each
    calibration sample's own neighbours exclude itself).

    ``statistic='raw'`` (ours, the former default, uncalibrated): features of the layers
    concatenated into one index unless ``per_layer``; the nonconformity of class ``c`` is the
    fraction ``1 - n(x, c) / k`` of disagreeing neighbours, or with ``per_class=True`` the squared
    L2 distance to the k-th nearest calibration sample of class ``c`` (``index_metric='ip'``:
    minus the inner product with it); conformity = ``-aggregation`` over layers of it.

    Papernot & McDaniel, "Deep k-Nearest Neighbors: Towards Confident, Interpretable and Robust Deep
    Learning", arXiv 2018.
    """

    reference = "Papernot & McDaniel, 2018"
    params = (
        Param("k", "int", 75, low=1, required=True, help=K_HELP),
        Param(
            "per_class",
            "bool",
            False,
            help="Quantiles against the calibration samples of the candidate class only "
            "(statistic='raw': one index per class, k-th distance).",
        ),
        Param(
            "per_layer",
            "bool",
            False,
            help="One quantile per layer, combined with `aggregation` (else counts are summed "
            "over layers).",
        ),
        AggregationParam(
            "aggregation",
            "str",
            "mean",
            help=f"How per-layer conformities are combined: one of {AGGREGATIONS} "
            "or a float p (p-norm).",
        ),
        INDEX_METRIC,
        Param(
            "statistic",
            "choice",
            "quantile",
            choices=("quantile", "raw"),
            help="quantile: the reference's calibrated label-count quantiles; raw: uncalibrated "
            "neighbour disagreement (or k-th class distance), layers concatenated.",
        ),
        POOLING,
    )

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        if self.statistic == "raw" and not self.per_layer:
            return {"x": self._concat(activations)}
        return self._per_layer(activations)

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        labels = labels.cpu()
        n_classes = int(self.n_classes or logits.shape[1])
        self.labels_ = labels
        self.n_classes_ = n_classes
        if self.statistic == "raw":
            self._fit_raw(features, labels, n_classes)
            return
        n, k = len(labels), self.k
        check_k(self, k, n)
        xs = {key: x.cpu() for key, x in features.items()}
        self.indexes_ = [(key, flat_index(x, self.index_metric)) for key, x in xs.items()]
        warn_missing_classes(
            self,
            labels,
            n_classes,
            "no neighbour ever carries their label, so their conformity is always 0",
        )
        self.calib_: list[Any] | None = None
        if not (self.per_layer or self.per_class):
            return
        if k >= n:
            raise ValueError(
                f"{self!r}: k={k} neighbours of each calibration sample among the "
                f"others need k + 1 = {k + 1} calibration samples; got {n}. Lower k "
                "or add data."
            )
        rows = torch.zeros(len(xs) if self.per_layer else 1, n)
        check_search(self, n, k + 1)
        for r, (key, index) in enumerate(self.indexes_):
            _, idx = self_query_search(index, xs[key], k)
            rows[r if self.per_layer else 0] += (labels[idx] == labels[:, None]).sum(1)
        if not self.per_class:
            self.calib_ = [row.sort().values for row in rows]
            return
        counts = class_counts(labels, n_classes).tolist()
        few = [c for c, m in enumerate(counts) if 0 < m < k]
        if few:
            degenerate(
                self,
                f"class(es) {few} have fewer calibration samples "
                f"({[counts[c] for c in few]}) than k={k}: their calibration label counts "
                "cannot reach k, so their per-class quantiles are coarse",
                "lower k or add calibration samples of these classes",
            )
        self.calib_ = [[row[labels == c].sort().values for c in range(n_classes)] for row in rows]

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        if self.statistic == "raw":
            return self._conformity_raw(features, logits)
        n_classes = self.n_classes_
        n_rows = len(self.indexes_) if self.per_layer else 1
        n = len(next(iter(features.values())))
        check_search(self, n, self.k, n_classes=n_classes)
        test = torch.zeros(n_rows, n, n_classes)
        for r, (key, index) in enumerate(self.indexes_):
            _, idx = faiss_search(index, features[key].cpu(), self.k)
            test[r if self.per_layer else 0] += label_counts(self.labels_, idx, n_classes).float()
        if self.calib_ is None:
            return test[0].double().to(logits.device)
        quantiles = []
        for row, calib in zip(test, self.calib_, strict=True):
            if not self.per_class:
                quantiles.append(torch.searchsorted(calib, row.contiguous()) / len(calib))
                continue
            q = torch.zeros_like(row)
            for c, calib_c in enumerate(calib):
                if len(calib_c):
                    q[:, c] = torch.searchsorted(calib_c, row[:, c].contiguous()) / len(calib_c)
            quantiles.append(q)
        agg = aggregate(torch.stack(quantiles), self.aggregation, 0)
        return agg.double().to(logits.device)

    # ------------------------------------------------------------------ statistic="raw"
    def _fit_raw(self, features: Features, labels: Tensor, n_classes: int) -> None:
        self.spaces_: list[tuple[str, object]] = []
        for key, x in features.items():
            x = x.cpu()
            check_k(self, self.k, len(x))
            if not self.per_class:
                self.spaces_.append((key, flat_index(x, self.index_metric)))
                continue
            counts = class_counts(labels, n_classes)
            short = [c for c in range(n_classes) if counts[c] < self.k]
            if short:
                raise ValueError(
                    f"{self!r}: per_class=True needs at least k={self.k} calibration samples per "
                    f"class; classes {short} have {[int(counts[c]) for c in short]}. Lower k, use "
                    "more calibration data or per_class=False."
                )
            per_class = []
            for c in range(n_classes):
                xc = x[labels == c]
                per_class.append((flat_index(xc, self.index_metric), xc))
            self.spaces_.append((key, per_class))

    def _conformity_raw(self, features: Features, logits: Tensor) -> Tensor:
        n_classes = self.n_classes_
        nonconf = []
        for key, space in self.spaces_:
            q = features[key].cpu()
            check_search(
                self,
                len(q),
                self.k,
                dims=q.shape[1],
                exact=self.per_class and self.index_metric == "l2",
                n_classes=0 if self.per_class else n_classes,
            )
            if not self.per_class:
                _, idx = faiss_search(space, q, self.k)
                nonconf.append(1.0 - label_counts(self.labels_, idx, n_classes) / self.k)
                continue
            nc = torch.empty(len(q), n_classes, dtype=torch.float64)
            for c, (index, xc) in enumerate(space):
                vals, _ = search(index, xc, q, self.k, self.index_metric)
                nc[:, c] = vals[:, -1] if self.index_metric == "l2" else -vals[:, -1]
            nonconf.append(nc)
        return -aggregate(torch.stack(nonconf), self.aggregation, 0).to(logits.device)


# ---------------------------------------------------------------------------- LID
@register_score
class LID(_NeighbourScore):
    """Local intrinsic dimensionality: with ``d_1 <= ... <= d_k`` the Euclidean distances from the
    features of ``x`` (all layers concatenated) to its k nearest calibration samples, the MLE
    ``LID = k / sum_i log(d_k / d_i)``; conformity = ``-LID`` (per sample; higher LID = more OoD).

    As the reference library: when the nearest neighbour is at distance exactly 0 (``x`` duplicates
    a calibration sample) LID = 0 (the highest conformity); when all k distances are equal and
    positive LID = +inf (conformity -inf). ``duplicates='skip'`` (ours) instead leaves the zero
    distances out of the MLE (``k`` becomes the number of positive distances; LID 0 only when all
    k are duplicates) and floors the log-sum so that the LID stays finite (huge).
    ``k >= 2`` since the ``i = k`` term is always 0 (k = 1 gives every sample LID = +inf).

    Ma et al., "Characterizing Adversarial Subspaces Using Local Intrinsic Dimensionality",
    ICLR 2018.
    """

    reference = "Ma et al., ICLR 2018"
    normalises_concatenation = True
    params = (
        Param("k", "int", 20, low=2, required=True, help=K_HELP),
        Param(
            "duplicates",
            "choice",
            "zero_lid",
            choices=("zero_lid", "skip"),
            help="zero_lid: a neighbour at distance 0 gives LID 0 (as the reference); skip: "
            "zero distances are left out of the estimate.",
        ),
        POOLING,
    )

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        return {"x": self._concat(activations)}

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        x = features["x"].cpu()
        check_k(self, self.k, len(x))
        self.calib_ = x
        self.index_ = flat_index(x, "l2")

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        q = features["x"]
        check_search(self, len(q), self.k, dims=q.shape[1], exact=True)
        sq, _ = search(self.index_, self.calib_, q.cpu(), self.k)
        d = sq.clamp_min(0).sqrt()
        lid = lid_mle(d) if self.duplicates == "skip" else lid_reference(d)
        return -lid.to(logits.device)


def lid_reference(d: Tensor) -> Tensor:
    """LID MLE ``k / sum_i log(d_k / d_i)`` per row of sorted Euclidean distances ``d`` ``(n, k)``:
    0 when ``d_1 = 0``, +inf when all distances are equal (the reference library's guards)."""
    lid = d.shape[1] / (d[:, -1:] / d).log().sum(1)
    lid = torch.where(d[:, 0] == 0, torch.zeros_like(lid), lid)
    return lid.nan_to_num(nan=torch.inf, posinf=torch.inf)


def lid_mle(d: Tensor) -> Tensor:
    """LID MLE per row of sorted Euclidean distances ``d`` ``(n, k)``, with the guards of
    :class:`LID` ``duplicates='skip'`` (zero distances left out)."""
    pos = d > 0
    ratio = torch.where(pos, d / d[:, -1:].clamp_min(torch.finfo(d.dtype).tiny), torch.ones_like(d))
    s = ratio.log().sum(1)
    m = pos.sum(1).double()
    lid = -m / s.clamp_max(-1e-300)
    return torch.where(m > 0, lid, torch.zeros_like(lid))


# ---------------------------------------------------------------------------- Trust
@register_score
class Trust(UsesLabels, _NeighbourScore):
    """Trust score (per class): per class ``c``, the calibration samples labelled ``c`` minus the
    ``floor(alpha * n_c)`` of them with the largest k-NN radius (Euclidean distance to their k-th
    nearest *other* sample of class ``c``) form the kept set ``H_c``; with ``d_c`` the Euclidean
    distance from ``x`` to the nearest point of ``H_c`` (features: layers concatenated), the
    conformity for class ``c`` is ``d_c* / d_c`` for every class but the closest one ``c*``, and
    ``d_c2 / d_c*`` (``c2``: the second closest) for ``c*`` itself, as the reference library: the
    ratio of the distance to the closest *other* kept set over the distance to ``H_c``. A class
    without calibration samples is at distance +inf (conformity 0); when ``x`` lies on a kept point
    (``d_c* = 0``) the conformity of ``c*`` is +inf; 0 / 0 gives 1.

    Differences with the paper's code: it uses the 2nd nearest point of each set (to skip the
    point itself when scoring training data) and keeps radii below the ``1 - alpha`` percentile;
    here (as in the reference library) the nearest point and an exact count of removed points.
    When a class has no more than k samples, its radii use its ``n_c - 1`` other samples (warned).

    Jiang, Kim, Guan & Gupta, "To Trust or Not to Trust a Classifier", NeurIPS 2018.
    """

    reference = "Jiang et al., NeurIPS 2018"
    normalises_concatenation = True
    params = (
        Param(
            "alpha",
            "float",
            0.0,
            low=0,
            high=1,
            high_exclusive=True,
            required=True,
            help="Fraction of each class' calibration samples removed as outliers "
            "(largest k-NN radius).",
        ),
        Param("k", "int", 10, low=1, help="Neighbour defining the k-NN radius used for filtering."),
        POOLING,
    )

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        return {"x": self._concat(activations)}

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        x, labels = features["x"].cpu(), labels.cpu()
        check_k(self, self.k, len(x))
        n_classes = int(self.n_classes or logits.shape[1])
        self.kept_: list[tuple[faiss.Index, Tensor] | None] = []
        small = []
        for c in range(n_classes):
            xc = x[labels == c]
            if len(xc) == 0:
                self.kept_.append(None)
                continue
            n_remove = int(self.alpha * len(xc))
            if n_remove > 0:
                if len(xc) <= self.k:
                    small.append(c)
                kk = min(self.k, len(xc) - 1)
                check_search(self, len(xc), kk + 1, dims=xc.shape[1], exact=True)
                sq, _ = search_loo(flat_index(xc, "l2"), xc, kk)
                order = sq[:, -1].argsort(descending=True, stable=True)
                xc = xc[order[n_remove:].sort().values]
            self.kept_.append((flat_index(xc, "l2"), xc))
        if sum(kept is not None for kept in self.kept_) < 2:
            raise ValueError(
                f"{self!r}: the calibration labels cover fewer than 2 classes; the "
                "trust score compares distances to different classes."
            )
        warn_missing_classes(
            self,
            labels,
            n_classes,
            "they are at infinite distance, so their conformity is always 0",
        )
        if small:
            counts = class_counts(labels, n_classes)
            degenerate(
                self,
                f"class(es) {small} have no more calibration samples "
                f"({[int(counts[c]) for c in small]}) than k={self.k}: their k-NN radii "
                "use their n_c - 1 other samples",
                "lower k or add calibration samples of these classes",
            )

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        q = features["x"].cpu()
        check_search(self, len(q), 1, dims=q.shape[1], exact=True)
        d = torch.full((len(q), len(self.kept_)), torch.inf, dtype=torch.float64)
        for c, kept in enumerate(self.kept_):
            if kept is not None:
                sq, _ = search(kept[0], kept[1], q, 1)
                d[:, c] = sq[:, 0].clamp_min(0).sqrt()
        return trust_ratio(d).to(logits.device)


def trust_ratio(d: Tensor) -> Tensor:
    """Per class, the distance to the closest *other* class' kept set over the distance to its
    own, from the distances ``d`` ``(n, C)`` to each class' kept set (``inf`` for empty classes,
    giving 0); ``0 / 0`` gives 1 and ``x / 0`` gives +inf, as the reference library."""
    two = d.topk(2, dim=1, largest=False).indices
    rows = torch.arange(len(d))
    closest, second = two[:, 0], two[:, 1]
    other = d[rows, closest][:, None].expand_as(d).clone()
    other[rows, closest] = d[rows, second]
    return (other / d).nan_to_num(nan=1.0, posinf=torch.inf)


# ---------------------------------------------------------------------------- NNGuide
@register_score
class NNGuide(_NeighbourScore):
    """Nearest-neighbour guidance (per sample): the guide bank holds the L2-normalised calibration
    features (layers concatenated; ``pooling='mean'`` by default: 4-D maps averaged over space,
    3-D ViT tokens over tokens; usually the penultimate layer) each scaled by its energy ``logsumexp(f)``; conformity =
    ``logsumexp(f(x)) * mean of the k largest inner products between the L2-normalised features
    of x and the bank`` (faiss inner-product index).

    Park, Jung & Teoh, "Nearest Neighbor Guidance for Out-of-Distribution Detection", ICCV 2023.
    """

    reference = "Park, Jung & Teoh, ICCV 2023"
    params = (
        Param("k", "int", 10, low=1, help="Number of bank neighbours averaged."),
        NNGUIDE_POOLING,
    )

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        return {"x": self._concat(activations)}

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        x = features["x"].cpu().double()
        check_k(self, self.k, len(x))
        energy = torch.logsumexp(logits.double().cpu(), dim=1)
        self.index_ = flat_index(F.normalize(x, dim=1) * energy[:, None], "ip")

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        z = F.normalize(features["x"].cpu().double(), dim=1)
        check_search(self, len(z), self.k)
        sims, _ = faiss_search(self.index_, z, self.k)
        energy = torch.logsumexp(logits.double(), dim=1)
        return energy * sims.mean(1).to(logits.device)


# ---------------------------------------------------------------------------- JTLA
TEST_KEYS = ("type", "mode", "k", "prior", "special_prior")
TEST_MODES = ("mle", "map", "dcm")
TEST_FORM = (
    "{'type': 'multinomial', 'mode': 'mle' | 'map' | 'dcm', 'k': int >= 1, optional "
    "'prior': float or array broadcastable to (n_classes, n_classes), optional "
    "'special_prior': float}"
)


class TestSpec(dict):
    """JTLA's ``test`` specification: a read-only, hashable dict (see :class:`JTLA`)."""

    __test__ = False  # not a pytest test class

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("JTLA's test specification is read-only: set score.test to a new dict")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(json.dumps(self, sort_keys=True))

    def __reduce__(self) -> tuple[Any, ...]:
        return (TestSpec, (dict(self),))


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class TestParam(Param):
    """JTLA's ``test``: a dict (or its JSON / Python-literal text) with keys ``type``
    (``'multinomial'``), ``mode`` (``'mle'``, ``'map'`` or ``'dcm'``; ``'compound'`` is read as
    ``'dcm'``), ``k`` (int >= 1) and optionally ``prior`` (a float, or an array / tensor / nested
    list broadcastable to ``(n_classes, n_classes)``, kept as nested lists) and ``special_prior``
    (a float). Normalised to a :class:`TestSpec`."""

    __test__ = False

    def range_text(self) -> str:
        return TEST_FORM

    def validate(self, value: Any, owner: str) -> Any:
        where = f"{owner}: parameter {self.name!r}"
        if isinstance(value, str):
            text = value.strip()
            try:
                value = json.loads(text)
            except ValueError:
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    raise ValueError(f"{where} must be {TEST_FORM}, got {text!r}") from None
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be {TEST_FORM}, got {value!r}")
        unknown = sorted(set(value) - set(TEST_KEYS), key=str)
        missing = [key for key in ("type", "mode", "k") if key not in value]
        if unknown or missing:
            raise ValueError(
                f"{where}: "
                + (f"unknown key(s) {unknown}" if unknown else "")
                + ("; " if unknown and missing else "")
                + (f"missing key(s) {missing}" if missing else "")
                + f"; expected {TEST_FORM}"
            )
        if value["type"] != "multinomial":
            raise ValueError(
                f"{where}: 'type' must be 'multinomial' (the only test implemented), "
                f"got {value['type']!r}"
            )
        mode = value["mode"]
        mode = getattr(mode, "value", mode)  # an enum member
        mode = "dcm" if mode == "compound" else mode
        if mode not in TEST_MODES:
            raise ValueError(f"{where}: 'mode' must be one of {TEST_MODES}, got {value['mode']!r}")
        k = value["k"]
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"{where}: 'k' must be an int >= 1, got {k!r}")
        spec: dict[str, Any] = {"type": "multinomial", "mode": mode, "k": int(k)}
        if "prior" in value:
            spec["prior"] = self._prior(value["prior"], where)
        if "special_prior" in value:
            eps = value["special_prior"]
            if not _number(eps) or not np.isfinite(float(eps)):
                raise ValueError(f"{where}: 'special_prior' must be a finite float, got {eps!r}")
            spec["special_prior"] = float(eps)
        return TestSpec(spec)

    @staticmethod
    def _prior(prior: Any, where: str) -> float | list:
        if _number(prior):
            out: float | list = float(prior)
        else:
            try:
                arr = np.asarray(
                    prior.detach().cpu() if isinstance(prior, Tensor) else prior, dtype=np.float64
                )
            except (TypeError, ValueError):
                arr = np.array([np.nan])
            if arr.ndim > 2 or arr.size == 0:
                raise ValueError(
                    f"{where}: 'prior' must be a float or an array broadcastable to "
                    f"(n_classes, n_classes), got {prior!r}"
                )
            out = arr.tolist() if arr.ndim else float(arr)
        if not np.isfinite(np.asarray(out)).all():
            raise ValueError(f"{where}: 'prior' must be finite, got {prior!r}")
        return out


def parse_layer_aggregation(spec: str) -> tuple[str, int | None, tuple[int, ...]]:
    """``(method, lpe_k, tuple_sizes)`` of a JTLA ``layer_aggregation``: ``'lpe'`` or
    ``'lpe:K'`` (``lpe_k`` = K or None), or a name of :data:`AGGREGATIONS` optionally followed by
    ``':n1,n2,...'`` (sizes of the layer tuples whose joint p-values are combined; default 1).
    Raises ``ValueError``."""
    method, _, specs = spec.strip().partition(":")
    method, specs = method.strip(), specs.strip()
    try:
        if method == "lpe":
            lpe_k = int(specs) if specs else None
            if lpe_k is not None and lpe_k < 1:
                raise ValueError
            return method, lpe_k, ()
        if method not in AGGREGATIONS:
            raise ValueError
        sizes = tuple(sorted({int(s) for s in specs.strip(",").split(",")})) if specs else (1,)
        if min(sizes) < 1:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"'lpe', 'lpe:K' or one of {AGGREGATIONS} optionally followed by "
            f"':n1,n2,...' (integers >= 1), got {spec!r}"
        ) from None
    return method, None, sizes


class LayerAggregationParam(Param):
    """JTLA's ``layer_aggregation`` string (see :func:`parse_layer_aggregation`)."""

    def range_text(self) -> str:
        return f"'lpe', 'lpe:K' or one of {AGGREGATIONS} optionally followed by ':n1,n2,...'"

    def validate(self, value: Any, owner: str) -> Any:
        if not isinstance(value, str):
            raise ValueError(
                f"{owner}: parameter {self.name!r} must be {self.range_text()}, got {value!r}"
            )
        try:
            parse_layer_aggregation(value)
        except ValueError as exc:
            raise ValueError(f"{owner}: parameter {self.name!r} must be {exc}") from None
        return value.strip()


def kl_divergence(counts: Tensor, expected: Tensor) -> Tensor:
    """``KL(counts / k || expected_g / sum expected_g)`` for each row ``g`` of ``expected``
    ``(G, C)`` and each row of ``counts`` ``(n, C)`` -> ``(G, n)``, in the counts' float precision
    as the reference library (float32 for integer inputs): ``0 log 0 = 0``; ``+inf`` where a count
    is positive but its expected probability 0; NaN for an invalid (NaN or negative) expected row
    or counts row."""
    expected_prob = expected / expected.sum(-1, keepdim=True)
    inputs_prob = counts / counts.sum(-1, keepdim=True)
    g, (n, c) = len(expected), counts.shape
    terms = F.kl_div(
        expected_prob.log()[:, None, :].expand(g, n, c),
        inputs_prob[None].expand(g, n, c),
        reduction="none",
    )
    div = terms.nan_to_num(posinf=torch.inf).sum(-1)
    div[:, (inputs_prob.isnan() | (inputs_prob < 0)).any(-1)] = torch.nan
    div[(expected_prob.isnan() | (expected_prob < 0)).any(-1)] = torch.nan
    return div


def dcm_surprise(counts: Tensor, alpha: Tensor) -> Tensor:
    """``-log DirichletMultinomial(counts; k, alpha_g)`` for each row of ``alpha`` ``(G, C)`` and
    each row of ``counts`` ``(n, C)`` (all summing to the same ``k``) -> ``(G, n)``."""
    total = counts.sum(-1)
    if len(total) and (total != total[0]).any():
        raise ValueError("counts must all sum to the same number of neighbours")
    m = total[0] if len(total) else torch.tensor(0)
    gln = torch.special.gammaln
    a = alpha.sum(-1)
    const = gln(m + a) - gln(m + 1) - gln(a) + gln(alpha).sum(-1)
    c = counts.to(alpha.dtype)
    return const[:, None] + gln(c + 1).sum(-1)[None] - gln(c[None] + alpha[:, None]).sum(-1)


def normalise_rows(t: Tensor, p: float | None) -> Tensor:
    """Divide each vector ``t[..., :]`` by its p-norm (``p > 0``; None: unchanged; zero vectors
    unchanged). A vector with infinite entries becomes ``sign * 1{inf} / (number of infs)^(1/p)``
    (unit norm, the infinities weighted alike)."""
    if p is None:
        return t
    flat = t.reshape(-1, t.shape[-1])
    norms = torch.linalg.vector_norm(flat, ord=p, dim=1, keepdim=True)
    out = flat / norms.where(norms != 0, 1)
    singular = norms.isinf().squeeze(1)
    if singular.any():
        rows = flat[singular]
        infs = rows.isinf()
        scale = infs.sum(1, keepdim=True).pow(1 / p).type_as(flat)
        sign = torch.where(rows.signbit(), -1, 1)
        out[singular] = torch.where(infs, 1, torch.zeros((), dtype=flat.dtype)) / scale * sign
    return out.reshape(t.shape)


def ak_lpe(index: faiss.Index, k: int, query: Tensor, *, self_query: bool = False) -> Tensor:
    """aK-LPE statistic: the mean faiss value (squared L2 distance, or inner product) of the
    neighbours ``k // 2 + 1 .. 3k // 2`` of each query (the last ``k`` of the ``3k // 2``
    nearest; with ``self_query`` among the indexed samples' others), float32; NaN when the index
    holds too few samples."""
    kk = 3 * k // 2
    if index.ntotal < kk + self_query:
        return torch.full((len(query),), torch.nan)
    vals, _ = self_query_search(index, query, kk) if self_query else faiss_search(index, query, kk)
    return vals[:, -k:].float().mean(1)


def joint_tail_counts(calib: Tensor, query: Tensor, tuples: list[Tensor]) -> Tensor:
    """For each query row ``t`` ``(L,)`` and each layer tuple ``T`` (rows of the ``(n_T, n)``
    index tensors in ``tuples``): ``#{j: calib[j, l] >= t[l] for all l in T}`` -> ``(n_query,
    sum n_T)`` int64, tuples in order."""
    out = []
    for combos in tuples:
        if combos.shape[1] == 1:  # one layer: sorted search
            cols = combos[:, 0]
            ref = calib[:, cols].T.sort(1).values.contiguous()
            below = torch.searchsorted(ref, query[:, cols].T.contiguous(), side="left")
            out.append((len(calib) - below).T)
            continue
        rows = max(1, 2**24 // max(1, len(calib) * combos.numel()))
        parts = []
        for s in range(0, len(query), rows):
            mask = calib[None] >= query[s : s + rows, None]
            parts.append(mask[:, :, combos].all(-1).sum(1))
        out.append(torch.cat(parts) if parts else torch.zeros(0, len(combos), dtype=torch.long))
    return torch.cat(out, dim=1)


@register_score
class JTLA(UsesLabels, _NeighbourScore):
    """Joint statistical Testing across Layers for Anomalies (per class), as the reference library
    computes it (multinomial tests on neighbour label counts).

    1. *Tests.* Per layer ``l`` (one faiss index each, ``index_metric`` default ``'ip'`` on the
       ``act_norm=2``-normalised activations), ``n_l(x)`` is the class histogram of the ``k =
       test['k']`` nearest calibration samples of ``x``. For class ``c`` the expected histogram
       ``E_lc`` sums the histograms of the calibration samples labelled ``c`` (their own
       neighbours excluding themselves). The test statistic ``T_lc(x)`` is, by ``test['mode']``:
       ``'mle'``: ``KL(n_l(x) / k || E_lc / |E_lc|)``; ``'map'``: the same with ``E_lc + prior_c -
       1``; ``'dcm'``: ``-log DirichletMultinomial(n_l(x); k, E_lc + prior_c)``. ``prior`` (default
       1) broadcasts to ``(C, C)`` (row ``c`` for class ``c``); ``special_prior=eps`` gives the
       authors' prior ``1 + eps / C`` off the diagonal and ``2 - (C - 1) eps / C`` on it. NaN
       statistics (e.g. a class without calibration samples) count as +inf. With
       ``pred_conditional`` a second set of tests uses the calibration samples *predicted* as
       ``c`` for ``E_lc``.
    2. *Layer aggregation.* ``layer_aggregation='agg[:n1,n2,...]'``: for every tuple of ``n``
       layers (every combination, or with ``layer_aggregation_consecutive`` every run of
       consecutive layers in the given layer order; default ``n = 1``), the joint p-value
       ``#{j: T_lc(x_j) >= T_lc(x) for all l in the tuple} / N`` over all ``N`` calibration
       samples ``x_j`` (their tests computed with the same k neighbours, themselves included); the
       p-values are combined with ``agg`` (:data:`AGGREGATIONS`; ``fisher`` = the sum of their
       logs, -inf when one is 0). ``'lpe[:K]'``: aK-LPE instead: the vectors ``(T_lc)_l``,
       normalised by their ``act_norm``-norm, are indexed per class; the statistic is the mean
       faiss value of the neighbours ``K//2+1 .. 3K//2`` (``K`` default ``test['k']``) and the
       q-value its left quantile among the calibration samples' (``1 -`` it with ``'l2'``).
    3. *Class aggregation.* ``'nat'``: conformity = the q-value of the predicted-class tests (true-
       class tests with ``pred_conditional=False``); ``'adv'``: it divided by the largest
       true-class q-value of the other classes (NaN -> 0).

    ``pvalues='conformal'`` (ours, the former behaviour): per layer the statistic is ``-log
    Multinomial(n_l(x); k, p_lc)`` with ``p_lc`` the Laplace-smoothed mean neighbour distribution
    of the class-``c`` calibration samples (``(sum counts + 1) / (n_c k + C)``, leave-one-out),
    the p-value ``(1 + #{j: y_j = c, T_lc(x_j) >= T_lc(x)}) / (1 + n_c)`` is conformal over the
    class-``c`` calibration samples (leave-one-out statistics, 1e-9 relative tolerance for float
    ties), combined over layers with ``layer_aggregation`` ``'fisher'`` (``chi2.sf(-2 sum log p,
    2L)``, a proper p-value) or another aggregation; it ignores ``mode``, ``prior``,
    ``class_aggregation`` and ``pred_conditional`` (conformity = the true-class combined p-value;
    0 for a class without calibration samples).

    ``n_classes_hint`` (ours): length of the histograms when the labels have more classes than
    the logits (None: the number of logits). Differences with the authors' code (as in the
    reference library): no bootstrap for the p-values, no dimension reduction before the search.

    Bounds and memory: ``n_classes_hint`` is at most :data:`JTLA_MAX_CLASSES`; the fit (before
    any forward pass, then before its searches) and the scoring estimate the class histograms
    ``(n, k, C)``, the test terms ``(C, n, C)``, the expected counts ``(C, C)`` per layer and the
    layer tuples of ``layer_aggregation``, and refuse, with the estimate, what cannot fit
    (:func:`~ood_core.budget.check_budget`).

    Raghuram et al., "A General Framework for Detecting Anomalous Inputs to DNN Classifiers",
    ICML 2021 (JTLA).
    """

    suggested_layers = ("last_block", "penultimate")
    default_act_norm = 2.0

    reference = "Raghuram et al., ICML 2021"
    params = (
        TestParam(
            "test",
            "str",
            TestSpec(type="multinomial", mode="mle", k=15),
            required=True,
            help=f"The statistical test: {TEST_FORM}.",
        ),
        LayerAggregationParam(
            "layer_aggregation",
            "str",
            "fisher",
            help="How per-layer p-values are combined: 'lpe', 'lpe:K' or one of "
            f"{AGGREGATIONS}, optionally ':n1,n2' (joint p-values of "
            "n-tuples of layers).",
        ),
        Param(
            "layer_aggregation_consecutive",
            "bool",
            False,
            help="Layer n-tuples are runs of consecutive layers only (else all combinations).",
        ),
        Param(
            "class_aggregation",
            "choice",
            "nat",
            choices=("nat", "adv"),
            help="nat: the predicted-class q-value; adv: over the best other class' q-value.",
        ),
        Param(
            "pred_conditional",
            "bool",
            True,
            help="Also test against the calibration samples predicted as each class.",
        ),
        Param("index_metric", "choice", "ip", choices=("l2", "ip"), help=INDEX_METRIC.help),
        Param(
            "pvalues",
            "choice",
            "joint",
            choices=("joint", "conformal"),
            help="joint: the reference's tests and p-values; conformal: our class-conditional "
            "conformal p-values of a multinomial likelihood.",
        ),
        Param(
            "n_classes_hint",
            "int",
            None,
            low=2,
            high=JTLA_MAX_CLASSES,
            nullable=True,
            help="Length of the class-count vectors (None: the number of logits; at most "
            f"{JTLA_MAX_CLASSES:,}: memory grows with its square).",
        ),
        POOLING,
    )

    def check_params(self) -> None:
        method, _, sizes = parse_layer_aggregation(self.layer_aggregation)
        if self.pvalues == "conformal" and (method == "lpe" or sizes != (1,)):
            raise ValueError(
                f"{type(self).__name__}: pvalues='conformal' combines one p-value per "
                f"layer: layer_aggregation must be one of {AGGREGATIONS} (no 'lpe', "
                f"no ':n' tuples), got {self.layer_aggregation!r}"
            )

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        return self._per_layer(activations)

    def label_classes(self, logits: Tensor) -> int | None:
        """Labels may index ``n_classes_hint`` classes (more than the logits)."""
        return max(self.n_classes_hint or 0, int(logits.shape[1]))

    # ------------------------------------------------------------------ memory
    def check_calibration(self, n_samples: int, class_counts: list[int] | None = None) -> None:
        """Also refuses, before any forward pass, tests that cannot fit in memory (with a bound
        network, else from ``n_classes_hint`` alone)."""
        super().check_calibration(n_samples, class_counts)
        rec = self.recorder_
        n_classes = self.n_classes_hint
        if rec is not None:
            n_classes = max(n_classes or 0, per_sample_numel(rec.info((0, 1)).output_size))
        if n_classes:
            self.check_memory(n_samples, n_classes, max(1, len(self.layers)))
            self._check_tuples(n_samples, max(1, len(self.layers)))

    def check_memory(self, n: int, n_classes: int, n_layers: int) -> None:
        """Refuse (:class:`~ood_core.budget.BudgetError`) the histograms and tests of ``n``
        samples that cannot fit: one-hot neighbour labels ``(n, k, C)`` int64 and ``(C, n, C)``
        float32 test terms (x2) for one layer at a time, plus, per layer and label group, the
        ``(C, C)`` expected counts and ``(C, n)`` tests."""
        k, c = self.test["k"], n_classes
        if self.pvalues == "conformal":
            n_bytes = 8 * n * k * c + 3 * 8 * n * c + n_layers * 8 * c * c
        else:
            groups = 2 if self.pred_conditional else 1
            per_layer = max(8 * n * (k + 1) * c, 2 * 4 * c * n * c)
            n_bytes = per_layer + groups * n_layers * (8 * c * c + 4 * c * n)
        check_budget(
            f"{self!r}: the class histograms and tests of {n:,} samples x {c:,} classes "
            f"(k={k}, {n_layers} layer(s))",
            n_bytes,
            "lower n_classes_hint (None: the number of logits), test['k'] or the number of samples",
        )

    def _check_tuples(self, n: int, n_layers: int) -> None:
        """Refuse layer tuples (``layer_aggregation='agg:n1,n2'``) whose index tensors and
        joint tail counts over ``n`` calibration samples cannot fit."""
        method, _, sizes = parse_layer_aggregation(self.layer_aggregation)
        if method == "lpe":
            return
        n_bytes = 0
        for size in sizes:
            if size > n_layers:
                continue
            if self.layer_aggregation_consecutive:
                n_tuples = n_layers - size + 1
            else:
                n_tuples = math.comb(n_layers, size)
            n_bytes += 8 * n_tuples * size + max(2**24, n * n_tuples * size)
        check_budget(
            f"{self!r}: the joint p-values of layer_aggregation {self.layer_aggregation!r} "
            f"over {n_layers} layers",
            n_bytes,
            "use smaller tuple sizes, layer_aggregation_consecutive=True or fewer layers",
        )

    # ------------------------------------------------------------------ calibration
    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        self.check_params()
        labels = labels.cpu()
        n_logits = logits.shape[1]
        n_classes = self.n_classes_hint or n_logits
        top = int(labels.max())
        if n_classes < n_logits or top >= n_classes:
            raise ValueError(
                f"{self!r}: n_classes_hint={n_classes} must be >= the number of "
                f"logits ({n_logits}) and > the largest label ({top})."
            )
        n, k = len(labels), self.test["k"]
        check_k(self, k, n)
        self.check_memory(n, n_classes, len(features))
        self._check_tuples(n, len(features))
        if k == n:
            raise ValueError(
                f"{self!r}: k={k} leave-one-out neighbours need k + 1 = {n + 1} "
                f"calibration samples; got {n}. Lower k or add data."
            )
        self.labels_ = labels
        self.n_classes_ = n_classes
        xs = [x.cpu() for x in features.values()]
        self.keys_ = list(features)
        self.indexes_ = [flat_index(x, self.index_metric) for x in xs]
        if self.pvalues == "conformal":
            self._fit_conformal(xs, labels, n_classes)
            return
        groups = {"true": labels}
        if self.pred_conditional:
            groups["pred"] = logits.argmax(1).cpu()
        self._warn_missing(groups, n_logits)
        self.prior_ = self._prior(n_classes)
        self.expected_: dict[str, list[Tensor]] = {g: [] for g in groups}
        calib_counts = []
        for index, x in zip(self.indexes_, xs, strict=True):
            _, idx = self_query_search(index, x, k)
            loo = F.one_hot(labels[idx], n_classes).sum(1)
            for g, lab in groups.items():
                sums = torch.zeros(n_classes, n_classes, dtype=torch.long).index_add_(0, lab, loo)
                self.expected_[g].append(sums)
            _, idx = faiss_search(index, x, k)
            calib_counts.append(F.one_hot(labels[idx], n_classes).sum(1))
        self.calib_tests_ = {g: self._tests(calib_counts, g) for g in groups}
        method, lpe_k, sizes = parse_layer_aggregation(self.layer_aggregation)
        self.lpe_: dict[str, tuple[list[faiss.Index], Tensor]] | None = None
        if method == "lpe":
            self._fit_lpe(lpe_k or k)
        else:
            self.tuples_ = self._layer_tuples(sizes, len(xs))

    def _warn_missing(self, groups: dict[str, Tensor], n_logits: int) -> None:
        consequence = (
            "tests are undefined (+inf for every sample, so every calibration "
            "sample ties with every input)"
        )
        warn_missing_classes(self, groups["true"], n_logits, f"their {consequence}")
        if "pred" in groups:
            missing = [
                c for c, m in enumerate(class_counts(groups["pred"], n_logits).tolist()) if m == 0
            ]
            if missing:
                degenerate(
                    self,
                    f"class(es) {missing} are never predicted on the calibration "
                    f"set: their predicted-class-conditional {consequence}",
                    "use pred_conditional=False or calibration data on which the network "
                    "predicts every class",
                )

    def _prior(self, n_classes: int) -> Tensor:
        """The Dirichlet prior ``(C, C)`` float32 (row ``c`` for class ``c``)."""
        spec = self.test
        if "special_prior" in spec:
            eps = spec["special_prior"]
            prior = torch.full((n_classes, n_classes), 1 + eps / n_classes)
            return prior.fill_diagonal_(2 - (n_classes - 1) * eps / n_classes)
        value = torch.as_tensor(spec.get("prior", 1.0), dtype=torch.float32)
        try:
            return torch.broadcast_to(value, (n_classes, n_classes))
        except RuntimeError:
            raise ValueError(
                f"{self!r}: test['prior'] of shape {tuple(value.shape)} does not "
                f"broadcast to (n_classes, n_classes) = ({n_classes}, {n_classes})."
            ) from None

    def _tests(self, counts: list[Tensor], group: str) -> Tensor:
        """Test statistics ``(C, n, L)`` float32 of the per-layer neighbour histograms ``counts``
        (int ``(n, C)`` each) against the expectations of ``group`` (NaN and +inf -> +inf)."""
        out = []
        for layer_counts, sums in zip(counts, self.expected_[group], strict=True):
            mode = self.test["mode"]
            if mode == "mle":
                stat = kl_divergence(layer_counts, sums)
            elif mode == "map":
                stat = kl_divergence(layer_counts, sums + self.prior_ - 1)
            else:
                stat = dcm_surprise(layer_counts, sums + self.prior_)
            out.append(stat.nan_to_num(nan=torch.inf, posinf=torch.inf))
        return torch.stack(out, 2)

    def _layer_tuples(self, sizes: tuple[int, ...], n_layers: int) -> list[Tensor]:
        tuples = []
        for size in sizes:
            if size > n_layers:
                degenerate(
                    self,
                    f"layer_aggregation {self.layer_aggregation!r} asks for tuples "
                    f"of {size} layers but the score reads {n_layers}: they contribute "
                    "no p-value",
                    "give more layers or smaller tuple sizes",
                )
                continue
            if self.layer_aggregation_consecutive:
                tuples.append(torch.arange(n_layers).unfold(0, size, 1))
            else:
                tuples.append(torch.combinations(torch.arange(n_layers), size).view(-1, size))
        if not tuples:
            raise ValueError(
                f"{self!r}: no layer tuple of the sizes {list(sizes)} fits in the "
                f"{n_layers} layer(s) read."
            )
        return tuples

    def _fit_lpe(self, lpe_k: int) -> None:
        self.lpe_k_ = lpe_k
        self.lpe_ = {}
        n = self.calib_tests_["true"].shape[1]
        if 3 * lpe_k // 2 < n:  # else aK-LPE is undefined (warned below), nothing searched
            check_search(self, n, 3 * lpe_k // 2 + 1)
        for g, tests in self.calib_tests_.items():
            normed = normalise_rows(tests, self.act_norm)
            indexes = [flat_index(t, self.index_metric) for t in normed]
            calib = torch.stack(
                [
                    ak_lpe(index, lpe_k, t, self_query=True).sort().values
                    for index, t in zip(indexes, normed, strict=True)
                ]
            )
            self.lpe_[g] = (indexes, calib.nan_to_num(nan=torch.inf))
        if self.calib_tests_["true"].shape[1] < 3 * lpe_k // 2 + 1:
            degenerate(
                self,
                f"aK-LPE with K={lpe_k} needs 3K//2 + 1 = {3 * lpe_k // 2 + 1} "
                "calibration samples: every statistic is undefined (+inf)",
                "lower K or add calibration data",
            )

    # ------------------------------------------------------------------ inference
    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        if self.pvalues == "conformal":
            return self._conformity_conformal(features, logits)
        k, n_classes = self.test["k"], self.n_classes_
        n_query = len(next(iter(features.values())))
        check_search(self, n_query, k, n_classes=n_classes)
        self.check_memory(n_query, n_classes, len(self.keys_))
        if self.lpe_ is not None and 3 * self.lpe_k_ // 2 <= len(self.labels_):
            check_search(self, n_query, 3 * self.lpe_k_ // 2)
        counts = []
        for key, index in zip(self.keys_, self.indexes_, strict=True):
            _, idx = faiss_search(index, features[key].cpu(), k)
            counts.append(F.one_hot(self.labels_[idx], n_classes).sum(1))
        q = {g: self._q_values(g, self._tests(counts, g)) for g in self.calib_tests_}
        q_true = q["true"]
        q_pred = q.get("pred", q_true)
        if self.class_aggregation == "nat":
            conf = q_pred
        else:
            top = q_true.topk(2, dim=1)
            rows = torch.arange(len(q_true))
            best_other = top.values[:, :1].expand_as(q_true).clone()
            best_other[rows, top.indices[:, 0]] = top.values[:, 1]
            conf = (q_pred / best_other).nan_to_num()
        return conf[:, : logits.shape[1]].double().to(logits.device)

    def _q_values(self, group: str, tests: Tensor) -> Tensor:
        """Layer-aggregated q-values ``(n, C)`` (higher = more conform) of the query ``tests``
        ``(C, n, L)`` against the calibration tests of ``group``."""
        calib = self.calib_tests_[group]
        if self.lpe_ is not None:
            indexes, calib_lpe = self.lpe_[group]
            normed = normalise_rows(tests, self.act_norm)
            lpe = torch.stack(
                [
                    ak_lpe(index, self.lpe_k_, t).nan_to_num(nan=torch.inf)
                    for index, t in zip(indexes, normed, strict=True)
                ]
            )
            p = torch.searchsorted(calib_lpe, lpe.contiguous()) / calib_lpe.shape[1]
            return (p if self.index_metric == "ip" else 1 - p).T
        p = torch.stack(
            [
                joint_tail_counts(calib[c], tests[c], self.tuples_) / calib.shape[1]
                for c in range(len(calib))
            ],
            dim=1,
        )
        method, _, _ = parse_layer_aggregation(self.layer_aggregation)
        return aggregate(p, method, 2)

    # ------------------------------------------------------------------ pvalues="conformal"
    def _stat(self, counts: Tensor, log_p: Tensor) -> Tensor:
        """``-log Multinomial(counts; k, p_c)`` for every class -> ``(n, C)``."""
        k = self.test["k"]
        log_k_fact = float(torch.lgamma(torch.tensor(k + 1.0, dtype=torch.float64)))
        log_coef = log_k_fact - torch.lgamma(counts + 1).sum(1)
        return -(log_coef[:, None] + counts @ log_p.T)

    def _fit_conformal(self, xs: list[Tensor], labels: Tensor, n_classes: int) -> None:
        k = self.test["k"]
        self.n_per_class_ = class_counts(labels, n_classes)
        warn_missing_classes(
            self,
            labels,
            min(n_classes, self.n_classes or n_classes),
            "their conformity is always 0",
        )
        self.layers_: list[tuple[Tensor, Tensor, list[Tensor]]] = []
        for index, x in zip(self.indexes_, xs, strict=True):
            check_search(self, len(x), k + 1, dims=x.shape[1], exact=self.index_metric == "l2")
            _, idx = search_loo(index, x, k, self.index_metric)
            counts = label_counts(labels, idx, n_classes)
            sums = torch.zeros(n_classes, n_classes, dtype=torch.float64)
            sums.index_add_(0, labels, counts)
            probs = (sums + 1) / (self.n_per_class_[:, None].double() * k + n_classes)
            log_p = probs.log()
            stats = self._stat(counts, log_p)
            sorted_stats = [stats[labels == c, c].sort().values for c in range(n_classes)]
            self.layers_.append((x, log_p, sorted_stats))

    def _conformity_conformal(self, features: Features, logits: Tensor) -> Tensor:
        n_query = len(next(iter(features.values())))
        dims = max(x.shape[1] for x, _, _ in self.layers_)
        exact = self.index_metric == "l2"
        check_search(
            self, n_query, self.test["k"], dims=dims, exact=exact, n_classes=self.n_classes_
        )
        pvals = []
        for key, index, (x, log_p, sorted_stats) in zip(
            self.keys_, self.indexes_, self.layers_, strict=True
        ):
            _, idx = search(index, x, features[key].cpu(), self.test["k"], self.index_metric)
            t = self._stat(label_counts(self.labels_, idx, len(sorted_stats)), log_p)
            p = torch.empty_like(t)
            for c, s in enumerate(sorted_stats):
                thr = t[:, c] - 1e-9 * t[:, c].abs().clamp_min(1)
                n_ge = len(s) - torch.searchsorted(s, thr.contiguous(), side="left")
                p[:, c] = (1.0 + n_ge.double()) / (1.0 + len(s))
            pvals.append(p)
        p = torch.stack(pvals)
        method, _, _ = parse_layer_aggregation(self.layer_aggregation)
        if method == "fisher":
            from scipy.special import chdtrc  # the chi-square survival function (= chi2.sf)

            fisher = (-2.0 * p.log().sum(0)).numpy()
            agg = torch.from_numpy(chdtrc(2 * len(pvals), fisher)).double()
        else:
            agg = aggregate(p, method, 0)
        agg = torch.where(self.n_per_class_[None] > 0, agg, torch.zeros_like(agg))
        return agg[:, : logits.shape[1]].to(logits.device)


__all__ = ["DkNN", "JTLA", "LID", "NNGuide", "Trust"]
