"""Nearest-neighbour score on recorded features: exact faiss flat search, or an opt-in
approximate faiss index with its recall measured at fit.

Features are pooled per layer (``pooling``, :mod:`ood_core.scores.features`: ``flatten`` by
default, as the reference library; ``mean`` / ``cls`` for 4-D maps and 3-D ViT tokens) and
concatenated. The float32 feature bank and every neighbour search are estimated before they are
computed (:func:`~ood_core.scores.search.check_bank`, :func:`~ood_core.scores.search.
check_search`), with remedies that fit the layers' shapes. The searches themselves are shared
with the other neighbour scores (:mod:`ood_core.scores.search`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
import torch
from torch import Tensor

import ood_core.scores.features as feat
import ood_core.scores.search as srch
from ood_core.core import normalise_activation
from ood_core.diagnostics import degenerate
from ood_core.layer_ids import LayerId, layers_text
from ood_core.params import Param
from ood_core.recorder import Recorder
from ood_core.scores.base import BaseScore, Features
from ood_core.scores.registry import register_score
from ood_core.scores.search import INDEX_METRIC, POOLING

AUTO_APPROX_ROWS = 200_000
"""``index='auto'``: exact (flat) search below this many bank rows, an IVF index from it on."""

AUTO_TARGET_RECALL = 0.99
"""``index='auto'`` with an IVF index doubles ``nprobe`` (up to ``nlist``) until the measured
recall@k reaches this."""

MIN_RECALL = 0.95
"""An approximate index whose measured recall@k is below this is reported as degenerate (an
:class:`~ood_core.diagnostics.OodLensWarning`), besides the fit note every approximate index
gets."""

MAX_NPROBE = 65_536


def auto_nlist(n_rows: int) -> int:
    """The inverted lists of ``index='auto'``'s IVF index: about ``4 sqrt(n)``."""
    return max(1, round(4 * math.sqrt(n_rows)))


class IndexParam(Param):
    """KNN's ``index``: ``'exact'``, ``'auto'`` or a faiss ``index_factory`` string (checked
    against the features' dims at fit, before any forward pass when the network is known)."""

    def range_text(self) -> str:
        return "'exact', 'auto' or a faiss index_factory string such as 'IVF256,Flat' or 'HNSW32'"

    def validate(self, value: Any, owner: str) -> Any:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"{owner}: parameter {self.name!r} must be {self.range_text()}, got {value!r}"
            )
        return value.strip()


INDEX = IndexParam(
    "index",
    "str",
    "exact",
    help="Neighbour search. exact: faiss flat search (the reference's); auto: exact below "
    f"{AUTO_APPROX_ROWS:,} calibration samples, else an IVF index of ~4 sqrt(n) lists; or a "
    "faiss index_factory string (approximate), e.g. 'IVF256,Flat', 'IVF1024,PQ16', 'HNSW32': "
    "trained on the calibration bank, its recall@k against exact search is measured at fit.",
)
NPROBE = Param(
    "nprobe",
    "int",
    16,
    low=1,
    high=MAX_NPROBE,
    help="Search breadth of an approximate index: IVF: inverted lists visited per query (at "
    "most nlist; more: higher recall, slower); HNSW: efSearch. Ignored by exact search.",
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

    ``index`` (ours; default ``'exact'``, the reference's flat search): a faiss ``index_factory``
    string such as ``'IVF256,Flat'`` or ``'HNSW32'`` searches an approximate index trained on the
    calibration bank (an IVF needs at least 4 rows per list), with ``nprobe`` lists visited (HNSW:
    ``efSearch``). Its recall@k against exact search is measured at fit on a seeded sample of up
    to 1,000 calibration samples (each one's k nearest others) and kept in ``recall_`` and
    ``fit_notes``; below 0.95 the fit also warns. That recall is the in-distribution one: inputs
    far from the bank (OoD) can be searched less well, HNSW graphs notably (see
    ``benchmarks/bench_neighbours.py``). ``'auto'``: exact below
    :data:`AUTO_APPROX_ROWS` calibration samples, else ``'IVF<4 sqrt(n)>,Flat'`` with ``nprobe``
    doubled until the recall reaches 0.99; the note says which and why.

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
        INDEX,
        NPROBE,
    )

    normalises_concatenation = True
    extract_params = ("pooling",)
    """:meth:`extract` reads ``pooling`` (and ``act_norm``): cached features serve every ``k``,
    ``index_metric``, ``index`` and ``nprobe``."""

    def check_layers(
        self, layers: Sequence[LayerId], recorder: Recorder | None = None
    ) -> tuple[LayerId, ...]:
        layers = super().check_layers(layers, recorder)
        feat.check_score_pooling(self, recorder, layers)
        return layers

    def check_calibration(self, n_samples: int, class_counts: list[int] | None = None) -> None:
        """Also refuses, before any forward pass, a bank that cannot fit and an ``index`` string
        that faiss cannot build for the features' dims or an IVF with too few rows per list."""
        super().check_calibration(n_samples, class_counts)
        if self.recorder_ is not None and self.layers:
            dims = srch.feature_dims(self.recorder_, self.layers, self.pooling)
            srch.check_bank(self, n_samples, dims)
            if self.index not in ("exact", "auto"):
                self._factory(self.index, dims, n_samples)

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        x = srch.flat_features(activations, self.layers, self.pooling)
        return {"x": normalise_activation(x, self.act_norm)}

    # ------------------------------------------------------------------ fit
    def _where(self) -> str:
        return f"KNN @ {layers_text(self.layers)}" if self.layers else "KNN"

    def _factory(self, spec: str, dims: int, n_rows: int) -> faiss.Index:
        """The empty faiss index of ``spec`` for ``dims``-dim features, or ``ValueError`` naming
        the parameter and examples; an IVF must have at least :data:`~ood_core.scores.search.
        IVF_MIN_ROWS_PER_LIST` of the ``n_rows`` bank rows per list."""
        try:
            index = srch.factory_index(spec, dims, self.index_metric)
        except ValueError as exc:
            raise ValueError(
                f"{self!r}: parameter 'index' = {spec!r} is not a faiss index for the "
                f"{dims:,}-dim features ({exc}); use 'exact', 'auto' or a faiss index_factory "
                f"string such as 'IVF256,Flat', 'IVF1024,PQ16' or 'HNSW32'."
            ) from None
        ivf = srch.ivf_of(index)
        need = srch.IVF_MIN_ROWS_PER_LIST
        if ivf is not None and n_rows < need * ivf.nlist:
            fewer = max(1, n_rows // 39)
            raise ValueError(
                f"{self!r}: parameter 'index' = {spec!r} has {ivf.nlist:,} inverted lists but the "
                f"calibration bank only {n_rows:,} rows; training its quantizer needs at least "
                f"{need} rows per list ({need * ivf.nlist:,}): use fewer lists (e.g. "
                f"'IVF{fewer},Flat'), more calibration data or index='exact'."
            )
        return index

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        x = features["x"]
        n = len(x)
        srch.check_k(self, self.k, n)
        self.fit_notes = []
        self.recall_: float | None = None
        """Measured recall@k of an approximate index (None for exact search)."""
        spec = self.index
        auto = spec == "auto"
        if auto:
            if n < AUTO_APPROX_ROWS:
                spec = "exact"
                self.fit_notes.append(
                    f"{self._where()}: index='auto': exact search ({n:,} calibration samples < "
                    f"AUTO_APPROX_ROWS = {AUTO_APPROX_ROWS:,})"
                )
            else:
                spec = f"IVF{auto_nlist(n)},Flat"
                self.fit_notes.append(
                    f"{self._where()}: index='auto': {spec!r} ({n:,} calibration samples >= "
                    f"AUTO_APPROX_ROWS = {AUTO_APPROX_ROWS:,}; nlist ~ 4 sqrt(n))"
                )
        self.index_spec_ = spec
        """The index searched: ``'exact'`` or the faiss index_factory string (``'auto'``
        resolved)."""
        if spec == "exact":
            self.index_ = srch.flat_index(x, self.index_metric)
            return
        self.index_ = self._fit_approximate(x.detach().cpu(), spec, auto)

    def _fit_approximate(self, bank: Tensor, spec: str, auto: bool) -> faiss.Index:
        index = self._factory(spec, bank.shape[1], len(bank))
        srch.train_and_add(index, bank)
        breadth = srch.set_search_breadth(index, self.nprobe)
        recall, m = srch.recall_at_k(index, bank, self.k, self.index_metric)
        ivf = srch.ivf_of(index)
        raised = ""
        if auto and ivf is not None and recall < AUTO_TARGET_RECALL and ivf.nprobe < ivf.nlist:
            first = ivf.nprobe
            while recall < AUTO_TARGET_RECALL and ivf.nprobe < ivf.nlist:
                breadth = srch.set_search_breadth(index, 2 * ivf.nprobe)
                recall, m = srch.recall_at_k(index, bank, self.k, self.index_metric)
            raised = f", raised from nprobe={first} to reach recall {AUTO_TARGET_RECALL}"
        self.recall_ = recall
        how = f" ({breadth}{raised})" if breadth else ""
        self.fit_notes.append(
            f"{self._where()}: index {spec!r}{how}: recall@{self.k} {recall:.4f} against exact "
            f"search on {m:,} calibration queries"
        )
        if recall < MIN_RECALL:
            if ivf is not None:
                wider = f"a larger nprobe (now {ivf.nprobe}, at most nlist = {ivf.nlist:,})"
            elif breadth and breadth.startswith("efSearch"):
                wider = f"a larger nprobe (HNSW efSearch, now {self.nprobe})"
            else:
                wider = "a finer index"
            degenerate(
                self,
                f"the approximate index {spec!r}{how} finds {recall:.1%} of the exact "
                f"{self.k} nearest neighbours (recall@{self.k} {recall:.4f} < {MIN_RECALL} on "
                f"{m:,} calibration queries), so its k-th distances are not the exact ones",
                f"use {wider} or index='exact'",
                layer=self.layers[0] if len(self.layers) == 1 else None,
            )
        return index

    # ------------------------------------------------------------------ inference
    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        srch.check_search(self, len(features["x"]), self.k)
        q = srch.to_faiss(features["x"])
        dist, idx = self.index_.search(q, self.k)
        ivf = srch.ivf_of(self.index_) if self.index_spec_ != "exact" else None
        lost = np.flatnonzero(idx[:, -1] < 0) if ivf is not None else ()
        if len(lost):  # fewer than k rows in the visited lists: search those queries in all lists
            nprobe = ivf.nprobe
            ivf.nprobe = ivf.nlist
            try:
                dist[lost] = self.index_.search(q[lost], self.k)[0]
            finally:
                ivf.nprobe = nprobe
        kth = torch.from_numpy(dist[:, -1].astype(np.float64)).to(logits.device)
        return -kth if self.index_metric == "l2" else kth


__all__ = ["AUTO_APPROX_ROWS", "KNN", "POOLING"]
