"""Neighbour search shared by the KNN and neighbour scores: feature banks, faiss indexes, searches.

One module for every search the neighbour family runs (:mod:`.knn`, :mod:`.neighbours`):

* the bank: the layers' features pooled and concatenated (:func:`flat_features`), its size
  (:func:`feature_dims`) and the memory checks of the bank and of a search (:func:`check_bank`,
  :func:`check_search`, :func:`check_k`), with the shared ``index_metric`` / ``pooling`` params;
* exact search: faiss flat indexes (:func:`flat_index`), faiss' own values and ids
  (:func:`faiss_search`), each indexed sample's nearest *others* (:func:`self_query_search`), and
  float64 distances recomputed from the bank (:func:`search`, :func:`search_loo`);
* a bank held as several flat indexes of at most ``shard_rows`` rows (:class:`ShardedFlatIndex`),
  searched shard by shard and merged into exactly what one flat index over all rows gives;
* opt-in approximate indexes (a faiss ``index_factory`` string such as ``'IVF256,Flat'`` or
  ``'HNSW32'``: :func:`factory_index`, :func:`train_and_add`, :func:`set_search_breadth`) and their
  measured recall against exact search (:func:`recall_at_k`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import torch
from torch import Tensor

import ood_core.scores.features as feat
from ood_core.budget import check_budget, net_device_dtype
from ood_core.layer_ids import LayerId
from ood_core.params import Param
from ood_core.recorder import Recorder

if TYPE_CHECKING:
    from ood_core.scores.base import BaseScore

SEARCH_CHUNK = 1024
"""Queries per block when exact float64 distances are recomputed from the neighbours' features
(see :func:`search`)."""

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


# ---------------------------------------------------------------------------- the bank
def flat_features(
    activations: dict[LayerId, Tensor], layers: tuple[LayerId, ...], pooling: str = "flatten"
) -> Tensor:
    """Concatenate the layers' activations pooled per sample (:func:`~ood_core.scores.features.
    pool`; default flattened) -> float32 ``(batch, D)``."""
    return torch.cat(
        [feat.pool(activations[layer], pooling, torch.float32) for layer in layers], dim=1
    )


def feature_dims(recorder: Recorder, layers: Sequence[LayerId], pooling: str = "flatten") -> int:
    """Length of the per-sample feature vector of ``layers`` concatenated, each pooled by
    ``pooling`` (:func:`ood_core.scores.features.pooled_size`: e.g. ``D`` for ``mean`` or
    ``cls`` on ``(N, L, D)`` tokens)."""
    return feat.feature_dims(recorder, layers, pooling)


def check_k(owner: BaseScore, k: int, n_calib: int) -> None:
    if k > n_calib:
        raise ValueError(
            f"{owner!r}: k={k} neighbours but only {n_calib} calibration samples; "
            f"use k <= {n_calib} or more calibration data."
        )


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


# ---------------------------------------------------------------------------- exact search
def to_faiss(x: Tensor | np.ndarray) -> np.ndarray:
    """``x`` as the C-contiguous float32 array faiss reads (no copy when it already is one)."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def faiss_metric(metric: str) -> int:
    """faiss' metric constant of ``'l2'`` (squared Euclidean) or ``'ip'`` (inner product)."""
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def flat_index(calib: Tensor, metric: str) -> faiss.Index:
    """A faiss flat (exact) index over ``calib`` ``(n, D)``: L2 or inner product."""
    index = (
        faiss.IndexFlatL2(calib.shape[1]) if metric == "l2" else faiss.IndexFlatIP(calib.shape[1])
    )
    index.add(to_faiss(calib))
    return index


def faiss_search(index: Any, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """faiss' ``(values float64, indices int64)``, both ``(n, k)`` on the CPU, as the index gives
    them (float32 squared L2 distances ascending, or inner products descending). ``index``: a
    faiss index or a :class:`ShardedFlatIndex`."""
    vals, idx = index.search(to_faiss(query), k)
    return torch.from_numpy(vals.astype(np.float64)), torch.from_numpy(idx.astype(np.int64))


def drop_self(vals: Tensor, idx: Tensor, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """From the ``k + 1`` nearest ``(vals, idx)`` of the indexed samples ``rows`` ``(n,)``, each
    one's ``k`` nearest *others* in faiss order: the sample itself is dropped when it is among its
    first ``k``, else the ``(k + 1)``-th (a sample hidden by exact duplicates, or absent, keeps its
    first ``k``, as in the reference library)."""
    keep = idx != rows[:, None]
    keep[:, k] = ~keep[:, :k].all(1)
    return vals[keep].view(len(idx), k), idx[keep].view(len(idx), k)


def self_query_search(
    index: Any, calib: Tensor, k: int, rows: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`faiss_search` of the indexed samples themselves, each one's ``k`` nearest *others*
    in faiss order (:func:`drop_self`): ``k + 1`` are searched. ``calib``: the indexed samples
    (all of them, in order), or with ``rows`` the indexed samples of those row numbers."""
    vals, idx = faiss_search(index, calib, k + 1)
    rows = torch.arange(len(idx)) if rows is None else rows.to(torch.int64)
    return drop_self(vals, idx, rows, k)


def search(
    index: Any, calib: Tensor, query: Tensor, k: int, metric: str = "l2"
) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest calibration samples of each query: ``(values, indices)``, both ``(n, k)``,
    on the CPU. ``l2``: exact squared Euclidean distances in float64, recomputed from ``calib`` (the
    indexed ``(n_calib, D)`` features) and sorted ascending; ``ip``: faiss' inner products."""
    vals, idx_t = faiss_search(index, query, k)
    if metric == "ip":
        return vals, idx_t
    q = query.detach().cpu()
    out = torch.empty(idx_t.shape, dtype=torch.float64)
    for s in range(0, len(q), SEARCH_CHUNK):
        diff = calib[idx_t[s : s + SEARCH_CHUNK]].double() - q[s : s + SEARCH_CHUNK, None].double()
        out[s : s + SEARCH_CHUNK] = diff.pow(2).sum(-1)
    out, order = out.sort(dim=1, stable=True)
    return out, idx_t.gather(1, order)


def search_loo(index: Any, calib: Tensor, k: int, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """Leave-one-out :func:`search` of the calibration set in its own index: each sample's ``k``
    nearest *other* samples (itself dropped; when an exact duplicate hid it, the last one)."""
    vals, idx = search(index, calib, calib, k + 1, metric)
    keep = idx != torch.arange(len(idx))[:, None]
    keep[keep.all(1), -1] = False
    return vals[keep].view(len(idx), k), idx[keep].view(len(idx), k)


# ---------------------------------------------------------------------------- sharded bank
SHARD_ALIGN = 1024
"""Shard sizes are rounded up to a multiple of this: faiss' BLAS path computes the distances of a
query block to the bank in blocks of ``faiss.cvar.distance_compute_blas_database_bs`` (1,024)
rows, and a shard that starts on such a block boundary gets float32 distances bit-identical to
one flat index over all rows (another boundary changes their last bits)."""

DEFAULT_SHARD_ROWS = 1 << 20
"""Rows per shard of a :class:`ShardedFlatIndex` unless told (1,048,576)."""


class ShardedFlatIndex:
    """An exact bank held as several faiss flat indexes of at most ``shard_rows`` rows each
    (rounded up to a multiple of :data:`SHARD_ALIGN`), searched like one faiss index:
    ``search(x, k) -> (distances float32 (n, k), ids int64 (n, k))`` over global row numbers.

    Each shard is searched for the ``k`` nearest and the per-shard lists are merged, shard after
    shard: the ``k`` best values, ties between shards kept by the *smaller* global row id (as
    faiss combines the 1,024-row blocks of its own search), missing neighbours (``k`` above the
    number of rows) last, as id -1 with faiss' padding value (``+FLT_MAX`` for L2, ``-FLT_MAX``
    for IP). The values are always those of one flat index over all rows (the same float32 bits),
    and so are the ids:

    * squared L2 distances: always (ascending, ties by ascending row id);
    * inner products: listed descending, ties by *descending* row id (faiss' flat inner-product
      order), identical except where rows tied at the k-th largest similarity straddle the k-th
      place: which of the tied rows faiss keeps then depends on the order its heap met them (not
      on the values and ids alone, so no merge can reproduce it); here they are tied rows too.

    Only ``(n, 2k)`` values and ids are held while merging, so ``k`` may exceed a shard. The
    float32 bit-identity relies on faiss choosing the same distance kernel for a shard as for the
    whole bank, which it decides from the query batch (its size and dims), not from the bank.
    Duck-compatible with the search helpers of this module (:func:`faiss_search`,
    :func:`search`, :func:`self_query_search`): ``d``, ``ntotal``, ``metric_type``,
    ``is_trained``, ``add``, ``search``, ``reconstruct_n``.
    """

    def __init__(self, d: int, metric: str = "l2", shard_rows: int = DEFAULT_SHARD_ROWS) -> None:
        if metric not in ("l2", "ip"):
            raise ValueError(f"ShardedFlatIndex: metric must be 'l2' or 'ip', got {metric!r}")
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
            raise ValueError(
                f"ShardedFlatIndex: shard_rows must be an int >= 1, got {shard_rows!r}"
            )
        self.d = int(d)
        self.metric = metric
        self.metric_type = faiss_metric(metric)
        self.shard_rows = -(-shard_rows // SHARD_ALIGN) * SHARD_ALIGN
        self.shards: list[faiss.Index] = []
        self.is_trained = True

    @property
    def ntotal(self) -> int:
        return sum(int(s.ntotal) for s in self.shards)

    def _new_shard(self) -> faiss.Index:
        shard = faiss.IndexFlatL2(self.d) if self.metric == "l2" else faiss.IndexFlatIP(self.d)
        self.shards.append(shard)
        return shard

    def add(self, x: Tensor | np.ndarray) -> None:
        """Append the rows of ``x`` ``(n, d)``: the last shard is filled up, then new ones."""
        x = to_faiss(x)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"ShardedFlatIndex: rows must have shape (n, {self.d}), got {x.shape}")
        start = 0
        while start < len(x):
            last = self.shards[-1] if self.shards else None
            if last is None or last.ntotal >= self.shard_rows:
                last = self._new_shard()
            take = min(self.shard_rows - int(last.ntotal), len(x) - start)
            last.add(x[start : start + take])
            start += take

    def search(self, x: Tensor | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest rows of each query, exactly as one flat index (class doc)."""
        x = to_faiss(x)
        l2 = self.metric == "l2"
        pad = np.float32(np.finfo(np.float32).max if l2 else -np.finfo(np.float32).max)
        dist = np.full((len(x), k), pad, dtype=np.float32)
        ids = np.full((len(x), k), -1, dtype=np.int64)
        offset = 0
        for shard in self.shards:
            d_s, i_s = shard.search(x, k)
            i_s = np.where(i_s >= 0, i_s + offset, -1)
            offset += int(shard.ntotal)
            dist, ids = merge_results(dist, ids, d_s, i_s, k, l2)
        if not l2:  # faiss lists tied inner products by descending row id
            order = np.lexsort((-ids, -dist, ids < 0), axis=1)
            dist, ids = np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)
        return dist, ids

    def reconstruct_n(self, start: int, n: int) -> np.ndarray:
        """Rows ``start .. start + n - 1`` of the bank ``(n, d)`` float32."""
        out, offset = [], 0
        for shard in self.shards:
            lo, hi = max(start, offset), min(start + n, offset + int(shard.ntotal))
            if lo < hi:
                out.append(shard.reconstruct_n(lo - offset, hi - lo))
            offset += int(shard.ntotal)
        return np.concatenate(out) if out else np.zeros((0, self.d), np.float32)


def merge_results(
    dist_a: np.ndarray,
    ids_a: np.ndarray,
    dist_b: np.ndarray,
    ids_b: np.ndarray,
    k: int,
    l2: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of two ``(n, ·)`` result lists over global ids, as faiss selects them: L2
    distances ascending (``l2``) or inner products descending, ties by ascending id, missing
    neighbours (id -1) last (:class:`ShardedFlatIndex` then lists tied inner products by
    descending id, as faiss)."""
    dist = np.concatenate([dist_a, dist_b], axis=1)
    ids = np.concatenate([ids_a, ids_b], axis=1)
    order = np.lexsort((ids, dist if l2 else -dist, ids < 0), axis=1)
    order = order[:, :k]
    return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)


def sharded_flat_index(
    calib: Tensor, metric: str, shard_rows: int = DEFAULT_SHARD_ROWS
) -> ShardedFlatIndex:
    """A :class:`ShardedFlatIndex` over ``calib`` ``(n, D)`` (as :func:`flat_index`)."""
    index = ShardedFlatIndex(calib.shape[1], metric, shard_rows)
    index.add(calib)
    return index


# ---------------------------------------------------------------------------- approximate
INDEX_EXAMPLES = "'exact', 'auto', 'IVF256,Flat', 'IVF1024,PQ16', 'HNSW32'"
"""Values of KNN's ``index`` the messages suggest."""

IVF_MIN_ROWS_PER_LIST = 4
"""An IVF index of ``nlist`` lists needs at least this many bank rows per list to train its
k-means quantizer (faiss itself asks for 39 per list for good centroids)."""

RECALL_QUERIES = 1000
"""Calibration queries (a seeded sample) on which an approximate index's recall is measured."""


def factory_index(spec: str, d: int, metric: str) -> faiss.Index:
    """``faiss.index_factory(d, spec, metric)``; raises ``ValueError`` with faiss' reason (the
    last part of its message) when the string does not describe an index of ``d`` dims."""
    try:
        return faiss.index_factory(d, spec, faiss_metric(metric))
    except RuntimeError as exc:
        text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        reason = text.split(": ", 1)[-1] if " at /" in text else text
        raise ValueError(reason) from None


def ivf_of(index: faiss.Index) -> Any:
    """The IVF index inside ``index`` (``faiss.extract_index_ivf``), or None when there is none."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def train_and_add(index: faiss.Index, bank: Tensor) -> None:
    """Train ``index`` on the bank (IVF quantizers, PQ codebooks) when it needs it, then add it.
    An IVF quantizer's k-means is seeded by faiss (deterministic given the bank)."""
    x = to_faiss(bank)
    ivf = ivf_of(index)
    if ivf is not None:  # our own check (IVF_MIN_ROWS_PER_LIST) replaces faiss' stderr notice
        ivf.cp.min_points_per_centroid = IVF_MIN_ROWS_PER_LIST
    if not index.is_trained:
        index.train(x)
    index.add(x)


def set_search_breadth(index: faiss.Index, breadth: int) -> str | None:
    """Set how widely ``index`` searches: an IVF's ``nprobe`` (inverted lists visited, at most
    ``nlist``), an HNSW graph's ``efSearch`` (candidates kept); return what was set, e.g.
    ``'nprobe=16'`` (``'nprobe=256 (nlist)'`` when clamped), or None for an index with neither."""
    ivf = ivf_of(index)
    if ivf is not None:
        ivf.nprobe = min(breadth, int(ivf.nlist))
        return f"nprobe={ivf.nprobe}" + (" (nlist)" if breadth > ivf.nlist else "")
    try:
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", breadth)
    except RuntimeError:
        return None
    return f"efSearch={breadth}"


def true_values(bank: Tensor, query: Tensor, idx: Tensor, metric: str) -> Tensor:
    """Float64 squared L2 distances (``'l2'``) or inner products (``'ip'``) ``(n, k)`` between each
    query and its neighbours ``idx`` ``(n, k)`` in ``bank``; a missing neighbour (-1) is at
    ``+inf`` (``-inf`` for ``'ip'``)."""
    nb = bank[idx.clamp_min(0)].double()
    q = query.double()[:, None]
    vals = (nb - q).pow(2).sum(-1) if metric == "l2" else (nb * q).sum(-1)
    return vals.masked_fill(idx < 0, torch.inf if metric == "l2" else -torch.inf)


def recall_at_k(
    index: Any,
    bank: Tensor,
    k: int,
    metric: str,
    n_queries: int = RECALL_QUERIES,
    seed: int = 0,
) -> tuple[float, int]:
    """``(recall@k, queries)`` of ``index`` (holding the rows of ``bank`` ``(n, D)`` in order)
    against exact search, on a seeded sample of up to ``n_queries`` bank rows, each query's ``k``
    nearest *other* rows (itself excluded as :func:`self_query_search` does, both searches).

    A neighbour the index returns counts as found when it is at least as near as the exact
    ``k``-th (its float64 distance, or inner product, recomputed from the bank): one of the exact
    k nearest, or a row tied with them (duplicates), so that exact search itself has recall 1."""
    bank = bank.detach().cpu()
    n = len(bank)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=gen)[: min(n_queries, n)].sort().values
    query = bank[rows]
    xb, xq = to_faiss(bank), to_faiss(query)
    kk = min(k + 1, n)
    d_e, i_e = faiss.knn(xq, xb, kk, faiss_metric(metric))
    exact = (torch.from_numpy(d_e.astype(np.float64)), torch.from_numpy(i_e.astype(np.int64)))
    if kk == k + 1:
        _, i_exact = drop_self(*exact, rows, k)
        _, i_found = self_query_search(index, query, k, rows)
    else:  # k = n: every row is a neighbour of every query, itself included
        i_exact = exact[1]
        _, i_found = faiss_search(index, query, k)
    v_exact = true_values(bank, query, i_exact, metric)
    v_found = true_values(bank, query, i_found, metric)
    if metric == "l2":
        radius = v_exact.max(1, keepdim=True).values
        found = v_found <= radius + 1e-9 * radius.abs() + 1e-12
    else:
        radius = v_exact.min(1, keepdim=True).values
        found = v_found >= radius - 1e-9 * radius.abs() - 1e-12
    found &= i_found >= 0
    return float(found.sum()) / found.numel(), len(rows)


__all__ = [
    "DEFAULT_SHARD_ROWS",
    "INDEX_METRIC",
    "POOLING",
    "SEARCH_CHUNK",
    "SHARD_ALIGN",
    "ShardedFlatIndex",
    "check_bank",
    "check_k",
    "check_search",
    "drop_self",
    "factory_index",
    "faiss_search",
    "feature_dims",
    "flat_features",
    "flat_index",
    "ivf_of",
    "merge_results",
    "recall_at_k",
    "search",
    "search_loo",
    "self_query_search",
    "set_search_breadth",
    "sharded_flat_index",
    "to_faiss",
    "train_and_add",
    "true_values",
]
