"""Neighbour-based scores on one or several layers: DkNN, LID, Trust, NNGuide and JTLA.

Every score here searches exact (flat) faiss indexes (helpers shared with :mod:`.knn`). Features:
each layer's activations, average-pooled over space to ``(N, C)`` when 4-D with ``H*W > 1``, else
flattened (:func:`~ood_core.scores.features.pool_features`); scores reading one feature space concatenate the layers.
Euclidean distances of the neighbours found by faiss are recomputed exactly in float64 from the
stored calibration features (faiss' float32 ``|x|^2 + |y|^2 - 2 x.y`` loses small distances).
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import chi2
from torch import Tensor

from ood_core.params import Param
from ood_core.recorder import LayerId
from ood_core.scores.base import BaseScore, Features
from ood_core.scores.features import pool_features
from ood_core.scores.knn import INDEX_METRIC, check_k, flat_features, flat_index, to_faiss

TRUST_MIN_DIST = 1e-12
"""Added to the denominator of the trust ratio (as in the reference implementation)."""
_CHUNK = 1024


# ---------------------------------------------------------------------------- helpers
def pooled_features(
    activations: dict[LayerId, Tensor], layers: tuple[LayerId, ...]
) -> dict[LayerId, Tensor]:
    """``{layer: pool_features(activations[layer], torch.float32)}`` for ``layers``, in order."""
    return {layer: pool_features(activations[layer], torch.float32) for layer in layers}


def layer_key(layer: LayerId) -> str:
    return f"{layer[0]}-{layer[1]}"


def faiss_search(index: faiss.Index, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """faiss' ``(values float64, indices int64)``, both ``(n, k)`` on the CPU, as the index gives
    them (float32 squared L2 distances ascending, or inner products descending)."""
    vals, idx = index.search(to_faiss(query), k)
    return torch.from_numpy(vals.astype(np.float64)), torch.from_numpy(idx.astype(np.int64))


def search(
    index: faiss.Index, calib: Tensor, query: Tensor, k: int, metric: str = "l2"
) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest calibration samples of each query: ``(values, indices)``, both ``(n, k)``,
    on the CPU. ``l2``: exact squared Euclidean distances in float64, recomputed from ``calib`` (the
    indexed ``(n_calib, D)`` features) and sorted ascending; ``ip``: faiss' inner products."""
    vals, idx_t = faiss_search(index, query, k)
    if metric == "ip":
        return vals, idx_t
    q = query.detach().cpu()
    out = torch.empty(idx_t.shape, dtype=torch.float64)
    for s in range(0, len(q), _CHUNK):
        diff = calib[idx_t[s : s + _CHUNK]].double() - q[s : s + _CHUNK, None].double()
        out[s : s + _CHUNK] = diff.pow(2).sum(-1)
    out, order = out.sort(dim=1, stable=True)
    return out, idx_t.gather(1, order)


def search_loo(
    index: faiss.Index, calib: Tensor, k: int, metric: str = "l2"
) -> tuple[Tensor, Tensor]:
    """Leave-one-out :func:`search` of the calibration set in its own index: each sample's ``k``
    nearest *other* samples (itself dropped; when an exact duplicate hid it, the last one)."""
    vals, idx = search(index, calib, calib, k + 1, metric)
    keep = idx != torch.arange(len(idx))[:, None]
    keep[keep.all(1), -1] = False
    return vals[keep].view(len(idx), k), idx[keep].view(len(idx), k)


def label_counts(labels: Tensor, idx: Tensor, n_classes: int) -> Tensor:
    """Class histogram ``(n, n_classes)`` (float64) of the neighbours ``idx`` ``(n, k)``."""
    return F.one_hot(labels[idx], n_classes).sum(1).double()


class _NeighbourScore(BaseScore):
    family = "neighbours"
    layer_rule = "any"

    def _concat(self, activations: dict[LayerId, Tensor]) -> Tensor:
        return flat_features(pooled_features(activations, self.layers), self.layers)

    def _per_layer(self, activations: dict[LayerId, Tensor]) -> Features:
        return {layer_key(lay): v for lay, v in pooled_features(activations, self.layers).items()}


K_HELP = "Number k of nearest calibration neighbours."


# ---------------------------------------------------------------------------- DkNN
class DkNN(_NeighbourScore):
    """Deep k-nearest neighbours (per class): for each feature space (all layers concatenated, or
    each layer with ``per_layer=True``), the nonconformity of class ``c`` is the fraction of the k
    nearest calibration samples whose label is not ``c``; it is aggregated over layers
    (``aggregation``: mean, max or sum; with sum it is Papernot's ``alpha_c / k``) and conformity =
    ``-aggregate``. With ``per_class=True`` one index per class is built instead and the
    nonconformity of class ``c`` is the squared L2 distance to the k-th nearest calibration sample
    of class ``c`` (``index_metric='ip'``: minus the inner product with it), aggregated likewise.

    Deviation: Papernot & McDaniel turn ``alpha_c`` into a p-value with a held-out calibration
    split (conformal prediction); here the raw (aggregated) disagreement is the conformity (that
    p-value is a non-increasing function of it, so rankings agree up to merged ties).

    Papernot & McDaniel, "Deep k-Nearest Neighbors: Towards Confident, Interpretable and Robust Deep
    Learning", arXiv 2018.
    """

    reference = "Papernot & McDaniel, 2018"
    params = (
        Param("k", "int", 75, low=1, required=True, help=K_HELP),
        Param("per_class", "bool", False,
              help="One index per class; conformity = minus the distance to its k-th neighbour."),
        Param("per_layer", "bool", False,
              help="One index per layer (else the layers are concatenated)."),
        Param("aggregation", "choice", "mean", choices=("mean", "max", "sum"),
              help="How per-layer nonconformities are combined."),
        INDEX_METRIC,
    )  # fmt: skip

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        if self.per_layer:
            return self._per_layer(activations)
        return {"x": self._concat(activations)}

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        labels = labels.cpu()
        n_classes = int(self.n_classes or logits.shape[1])
        if int(labels.max()) >= n_classes:
            raise ValueError(f"{self!r}: labels go up to {int(labels.max())} but the network has "
                             f"{n_classes} classes.")  # fmt: skip
        self.labels_ = labels
        self.spaces_: list[tuple[str, object]] = []
        for key, x in features.items():
            x = x.cpu()
            check_k(self, self.k, len(x))
            if not self.per_class:
                self.spaces_.append((key, flat_index(x, self.index_metric)))
                continue
            counts = torch.bincount(labels, minlength=n_classes)
            short = [c for c in range(n_classes) if counts[c] < self.k]
            if short:
                raise ValueError(
                    f"{self!r}: per_class=True needs at least k={self.k} calibration samples per "
                    f"class; classes {short} have {[int(counts[c]) for c in short]}. Lower k, use "
                    "more calibration data or per_class=False.")  # fmt: skip
            per_class = []
            for c in range(n_classes):
                xc = x[labels == c]
                per_class.append((flat_index(xc, self.index_metric), xc))
            self.spaces_.append((key, per_class))

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        n_classes = int(self.n_classes or logits.shape[1])
        nonconf = []
        for key, space in self.spaces_:
            q = features[key].cpu()
            if not self.per_class:
                _, idx = faiss_search(space, q, self.k)
                nonconf.append(1.0 - label_counts(self.labels_, idx, n_classes) / self.k)
                continue
            nc = torch.empty(len(q), n_classes, dtype=torch.float64)
            for c, (index, xc) in enumerate(space):
                vals, _ = search(index, xc, q, self.k, self.index_metric)
                nc[:, c] = vals[:, -1] if self.index_metric == "l2" else -vals[:, -1]
            nonconf.append(nc)
        stacked = torch.stack(nonconf)
        aggregate = {"mean": torch.mean, "sum": torch.sum, "max": torch.amax}[self.aggregation]
        agg = aggregate(stacked, 0)
        return -agg.to(logits.device)


# ---------------------------------------------------------------------------- LID
class LID(_NeighbourScore):
    """Local intrinsic dimensionality: with ``d_1 <= ... <= d_k`` the Euclidean distances from the
    features of ``x`` (all layers concatenated) to its k nearest calibration samples, the MLE
    ``LID = -k / sum_i log(d_i / d_k)``; conformity = ``-LID`` (per sample; higher LID = more OoD).

    Guards: neighbours at distance exactly 0 (duplicates of ``x``) carry no dimension information
    and are left out (``k`` becomes the number of neighbours at positive distance); when all k are
    duplicates LID = 0; when all positive distances are equal the sum is floored at ``-1e-300`` so
    the LID stays finite (huge). ``k >= 2`` since the ``i = k`` term is always 0.

    Ma et al., "Characterizing Adversarial Subspaces Using Local Intrinsic Dimensionality",
    ICLR 2018.
    """

    reference = "Ma et al., ICLR 2018"
    params = (Param("k", "int", 20, low=2, required=True, help=K_HELP),)

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        return {"x": self._concat(activations)}

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        x = features["x"].cpu()
        check_k(self, self.k, len(x))
        self.calib_ = x
        self.index_ = flat_index(x, "l2")

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        sq, _ = search(self.index_, self.calib_, features["x"].cpu(), self.k)
        return -lid_mle(sq.clamp_min(0).sqrt()).to(logits.device)


def lid_mle(d: Tensor) -> Tensor:
    """LID MLE per row of sorted Euclidean distances ``d`` ``(n, k)``, with the guards of
    :class:`LID` (zero distances left out)."""
    pos = d > 0
    ratio = torch.where(pos, d / d[:, -1:].clamp_min(torch.finfo(d.dtype).tiny), torch.ones_like(d))
    s = ratio.log().sum(1)
    m = pos.sum(1).double()
    lid = -m / s.clamp_max(-1e-300)
    return torch.where(m > 0, lid, torch.zeros_like(lid))


# ---------------------------------------------------------------------------- Trust
class Trust(_NeighbourScore):
    """Trust score (per class): per class ``c``, the calibration samples labelled ``c`` minus the
    ``floor(alpha * n_c)`` of them with the largest k-NN radius (Euclidean distance to their k-th
    nearest *other* sample of class ``c``; k is capped at ``n_c - 1``) form the kept set ``H_c``;
    conformity for class ``c`` = ``d(x, H_other) / (d(x, H_c) + 1e-12)`` where ``d`` is the
    Euclidean distance to the nearest point of a set (features: layers concatenated) and
    ``H_other`` the closest kept set of another class. A class with no calibration sample gets 0.

    Deviations from the reference code: it uses the 2nd nearest point of each set (to skip the
    point itself when scoring training data) and keeps radii below the ``1 - alpha`` percentile;
    here the nearest point and an exact count of removed points.

    Jiang, Kim, Guan & Gupta, "To Trust or Not to Trust a Classifier", NeurIPS 2018.
    """

    reference = "Jiang et al., NeurIPS 2018"
    params = (
        Param("alpha", "float", 0.0, low=0, high=1, high_exclusive=True, required=True,
              help="Fraction of each class' calibration samples removed as outliers "
                   "(largest k-NN radius)."),
        Param("k", "int", 10, low=1, help="Neighbour defining the k-NN radius used for filtering."),
    )  # fmt: skip

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        return {"x": self._concat(activations)}

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        x, labels = features["x"].cpu(), labels.cpu()
        check_k(self, self.k, len(x))
        n_classes = int(self.n_classes or logits.shape[1])
        self.kept_: list[tuple[faiss.Index, Tensor] | None] = []
        for c in range(n_classes):
            xc = x[labels == c]
            if len(xc) == 0:
                self.kept_.append(None)
                continue
            n_remove = int(self.alpha * len(xc) + 1e-9)
            if n_remove > 0:
                kk = min(self.k, len(xc) - 1)
                sq, _ = search_loo(flat_index(xc, "l2"), xc, kk)
                radius = sq[:, -1]
                order = radius.argsort(descending=True, stable=True)
                xc = xc[order[n_remove:].sort().values]
            self.kept_.append((flat_index(xc, "l2"), xc))
        if sum(kept is not None for kept in self.kept_) < 2:
            raise ValueError(f"{self!r}: the calibration labels cover fewer than 2 classes; the "
                             "trust score compares distances to different classes.")  # fmt: skip

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        q = features["x"].cpu()
        d = torch.full((len(q), len(self.kept_)), torch.inf, dtype=torch.float64)
        for c, kept in enumerate(self.kept_):
            if kept is not None:
                sq, _ = search(kept[0], kept[1], q, 1)
                d[:, c] = sq[:, 0].clamp_min(0).sqrt()
        return trust_ratio(d).to(logits.device)


def trust_ratio(d: Tensor) -> Tensor:
    """``d_other / (d_c + 1e-12)`` per class from the distances ``d`` ``(n, C)`` to each class' kept
    set (``inf`` for empty classes, giving 0)."""
    two = d.topk(2, dim=1, largest=False)
    is_min = torch.arange(d.shape[1])[None] == two.indices[:, :1]
    other = torch.where(is_min, two.values[:, 1:2], two.values[:, :1])
    return other / (d + TRUST_MIN_DIST)


# ---------------------------------------------------------------------------- NNGuide
class NNGuide(_NeighbourScore):
    """Nearest-neighbour guidance (per sample): the guide bank holds the L2-normalised calibration
    features (layers concatenated; usually the penultimate layer) each scaled by its energy
    ``logsumexp(f)``; conformity = ``logsumexp(f(x)) * mean of the k largest inner products between
    the L2-normalised features of x and the bank`` (faiss inner-product index).

    Park, Jung & Teoh, "Nearest Neighbor Guidance for Out-of-Distribution Detection", ICCV 2023.
    """

    reference = "Park, Jung & Teoh, ICCV 2023"
    params = (Param("k", "int", 10, low=1, help="Number of bank neighbours averaged."),)

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        return {"x": self._concat(activations)}

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        x = features["x"].cpu().double()
        check_k(self, self.k, len(x))
        energy = torch.logsumexp(logits.double().cpu(), dim=1)
        self.index_ = flat_index(F.normalize(x, dim=1) * energy[:, None], "ip")

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        z = F.normalize(features["x"].cpu().double(), dim=1)
        sims, _ = faiss_search(self.index_, z, self.k)
        energy = torch.logsumexp(logits.double(), dim=1)
        return energy * sims.mean(1).to(logits.device)


# ---------------------------------------------------------------------------- JTLA
class JTLA(_NeighbourScore):
    """Joint statistical testing across layers (simplified; per class). Per layer ``l``: the class
    histogram ``n_l(x)`` of the k nearest calibration samples (exact L2); for class ``c`` the test
    statistic ``T_lc(x) = -log Multinomial(n_l(x); k, p_lc)`` where ``p_lc`` is the mean neighbour
    class distribution of the calibration samples labelled ``c`` (leave-one-out: a calibration
    sample is not its own neighbour), Laplace-smoothed: ``(sum counts + 1) / (n_c k + C)``; the
    per-layer p-value ``p_lc(x) = (1 + #{j: y_j = c, T_lc(x_j) >= T_lc(x)}) / (1 + n_c)`` over the
    calibration samples of class ``c`` (leave-one-out statistics); p-values are combined over layers
    with Fisher's method (``chi2.sf(-2 sum_l log p_lc, 2L)``) or their minimum; conformity for class
    ``c`` = the combined p-value (higher = more in-distribution; 0 for a class without calibration
    samples).

    Simplifications w.r.t. the paper: a multinomial count model with plug-in smoothed class
    probabilities instead of their per-layer test statistics (the paper also scores the predicted
    class against the others with likelihood ratios); the p-value counts calibration statistics
    ``>=`` (with a 1e-9 relative tolerance for float ties) with the usual conformal +1 so it is
    never 0; layers are treated as independent in Fisher's method; no Bonferroni factor on the
    minimum (it does not change the ranking).

    Raghuram et al., "A General Framework for Detecting Anomalous Inputs to DNN Classifiers",
    ICML 2021 (JTLA).
    """

    suggested_layers = ("last_block", "penultimate")

    reference = "Raghuram et al., ICML 2021"
    params = (
        Param("k", "int", 10, low=1, help=K_HELP),
        Param("aggregation", "choice", "fisher", choices=("fisher", "min"),
              help="Combine per-layer p-values with Fisher's method or their minimum."),
        Param("n_classes_hint", "int", None, low=2, nullable=True,
              help="Length of the class-count vectors (None: the number of logits)."),
    )  # fmt: skip

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        return self._per_layer(activations)

    def _stat(self, counts: Tensor, log_p: Tensor) -> Tensor:
        """``-log Multinomial(counts; k, p_c)`` for every class -> ``(n, C)``."""
        k = self.k
        log_k_fact = float(torch.lgamma(torch.tensor(k + 1.0, dtype=torch.float64)))
        log_coef = log_k_fact - torch.lgamma(counts + 1).sum(1)
        return -(log_coef[:, None] + counts @ log_p.T)

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        labels = labels.cpu()
        n_logits = logits.shape[1]
        n_classes = self.n_classes_hint or n_logits
        top = int(labels.max())
        if n_classes < n_logits or top >= n_classes:
            raise ValueError(f"{self!r}: n_classes_hint={n_classes} must be >= the number of "
                             f"logits ({n_logits}) and > the largest label ({top}).")  # fmt: skip
        n = len(labels)
        check_k(self, self.k, n)
        if self.k == n:
            raise ValueError(f"{self!r}: k={self.k} leave-one-out neighbours need k + 1 = {n + 1} "
                             f"calibration samples; got {n}. Lower k or add data.")  # fmt: skip
        self.labels_ = labels
        self.n_per_class_ = torch.bincount(labels, minlength=n_classes)
        self.layers_: list[tuple[str, faiss.Index, Tensor, Tensor, list[Tensor]]] = []
        for key, x in features.items():
            x = x.cpu()
            index = flat_index(x, "l2")
            _, idx = search_loo(index, x, self.k)
            counts = label_counts(labels, idx, n_classes)
            sums = torch.zeros(n_classes, n_classes, dtype=torch.float64)
            sums.index_add_(0, labels, counts)
            probs = (sums + 1) / (self.n_per_class_[:, None].double() * self.k + n_classes)
            log_p = probs.log()
            stats = self._stat(counts, log_p)
            sorted_stats = [stats[labels == c, c].sort().values for c in range(n_classes)]
            self.layers_.append((key, index, x, log_p, sorted_stats))

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        pvals = []
        for key, index, x, log_p, sorted_stats in self.layers_:
            _, idx = search(index, x, features[key].cpu(), self.k)
            t = self._stat(label_counts(self.labels_, idx, len(sorted_stats)), log_p)
            p = torch.empty_like(t)
            for c, s in enumerate(sorted_stats):
                thr = t[:, c] - 1e-9 * t[:, c].abs().clamp_min(1)
                n_ge = len(s) - torch.searchsorted(s, thr.contiguous(), side="left")
                p[:, c] = (1.0 + n_ge.double()) / (1.0 + len(s))
            pvals.append(p)
        p = torch.stack(pvals)
        if self.aggregation == "min":
            agg = p.amin(0)
        else:
            fisher = (-2.0 * p.log().sum(0)).numpy()
            agg = torch.from_numpy(chi2.sf(fisher, 2 * len(pvals))).double()
        agg = torch.where(self.n_per_class_[None] > 0, agg, torch.zeros_like(agg))
        return agg[:, : logits.shape[1]].to(logits.device)


SCORES = (DkNN, LID, Trust, NNGuide, JTLA)
__all__ = ["DkNN", "JTLA", "LID", "NNGuide", "Trust"]
