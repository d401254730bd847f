"""Gram-matrix deviations (Sastry & Oore)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ood_core.budget import check_budget, memory_limit, net_device_dtype, per_sample_numel
from ood_core.diagnostics import degenerate
from ood_core.layer_ids import LayerId, layer_text
from ood_core.params import Param
from ood_core.scores.base import BaseScore, Features
from ood_core.scores.class_rows import ClassRows, check_spill_room
from ood_core.scores.labels import UsesLabels
from ood_core.scores.registry import register_score

PRECISIONS = {"input": None, "float64": torch.float64}
MAX_GRAM_ORDER = 64
"""Highest ``max_gram_order`` accepted. Order ``p`` raises activations to the power ``2p``: at
``p = 64`` any value outside ``[0.5, 2]`` already overflows or underflows float32 (``[2^-8,
2^8]`` for float64), so higher orders only add NaN or zero statistics, while each order costs
one more batched ``(ch x L) (L x ch)`` product per sample and ``ch`` (or ``2 ch``) more float64
features per sample and layer (the paper uses orders up to 10; the default is 8)."""
CHUNK = 256
"""Test samples per ``(chunk, n_classes, n_stats)`` deviation block in :meth:`Gram._conformity`."""
GRAM_BATCH_BYTES = 2**30
"""Estimated memory of the ``(n, ch, ch)`` Gram matrices computed at once (3 copies: the power,
the product and its root): a batch is split into chunks of that many bytes' worth of samples (at
least one), so the batch size never multiplies a wide layer's ``ch x ch`` matrices beyond it."""


SAMPLE_BLOCK_BYTES = 2**20
"""Bytes of activations (or of one Gram matrix per sample, if larger) per block of samples in
:func:`gram_stats` (at least one sample): a block's powers stay in cache while its orders are
computed."""
SPLIT_ROWS = 32
"""Rows per band of the Gram matrices in :func:`gram_stats` (at most :data:`SPLIT_BANDS` bands,
one below ``2 * SPLIT_ROWS`` channels): band ``[r0, r1)`` is multiplied by channels ``r0..ch``
only, so that only the blocks holding the upper triangle are computed and rooted (3/4 of the
products with 2 bands, 2/3 with 3, 7/12 with 6)."""
SPLIT_BANDS = 6


def gram_stats(
    a: Tensor, max_order: int, separate_diagonal: bool = False, dtype: torch.dtype | None = None
) -> Tensor:
    """Gram statistics of activations ``a`` ``(n, ch, ...)`` (dim 1 = channels) -> ``(n, P, S)``.

    For ``p = 1..P`` with ``F`` one sample's activations reshaped to ``(ch, L)``:
    ``G_p = |F^p (F^p)^T|^(1/p)`` (elementwise power, absolute value and root), then the row sums of
    its upper triangle (diagonal included): ``S = ch`` values; with ``separate_diagonal`` the
    diagonal, then the strict upper-triangle row sums: ``S = 2 ch``.

    The products run in ``dtype`` (default: ``a``'s own dtype), ``F^p`` built incrementally
    (``F^(p-1) F``). A coefficient that overflows it is NaN (an infinite product has no usable
    root), and a NaN poisons its row sum; coefficients that underflow are 0. One value per channel
    (``L = 1``) uses the closed form ``|f_i| sum_{j >= i} |f_j|`` (``|f_i|^2`` on the diagonal)
    for each sample and order where no product can overflow or underflow and no row sum overflow
    (the same numbers up to rounding), the products elsewhere. The result is float64; each
    sample's statistics do not depend on the other samples of ``a``.
    """
    dtype = a.dtype if dtype is None else dtype
    n, ch = a.shape[0], a.shape[1]
    f = a.detach().to(dtype).reshape(n, ch, -1)
    out = torch.empty(
        n, max_order, 2 * ch if separate_diagonal else ch, dtype=torch.float64, device=f.device
    )
    if f.shape[2] == 1:
        _rank_one_stats(f, max_order, separate_diagonal, out)
    else:
        _block_stats(f, max_order, separate_diagonal, out)
    return out


def _rank_one_safe(v: Tensor, max_order: int) -> Tensor:
    """``(n, max_order)``: whether, for sample ``s`` of ``v`` ``(n, ch)`` at order ``p``, every
    nonzero product ``v_i^p v_j^p`` (and every power on the way) is a normal number of ``v``'s
    dtype (neither overflow nor underflow) and no upper-triangle row sum can overflow, so that
    the statistics equal the closed form up to rounding."""
    mag = v.abs().double()
    info = torch.finfo(v.dtype)
    ceiling, floor = math.log(info.max) - 1, math.log(info.tiny) + 1
    log_top = mag.amax(1).log()  # -inf for an all-zero sample, NaN with a NaN
    log_bottom = torch.where(mag > 0, mag, math.inf).amin(1).log()  # +inf without nonzero
    sums_fit = (math.log(v.shape[1]) + 2 * log_top < ceiling) & torch.isfinite(mag).all(1)
    two_p = 2 * torch.arange(1, max_order + 1, dtype=torch.float64, device=v.device)
    return (
        sums_fit[:, None]
        & (two_p * log_top[:, None] < ceiling)
        & (two_p * log_bottom[:, None] > floor)
    )


def _rank_one_stats(f: Tensor, max_order: int, separate_diagonal: bool, out: Tensor) -> None:
    """:func:`gram_stats` of ``f`` ``(n, ch, 1)`` into ``out``: the closed form where
    :func:`_rank_one_safe`, the products (:func:`_product_rows`) elsewhere."""
    mag = f[:, :, 0].abs().double()
    suffix = mag.flip(1).cumsum(1).flip(1)  # sum_{j >= i} |f_j|
    if separate_diagonal:
        strict = torch.zeros_like(suffix)
        strict[:, :-1] = suffix[:, 1:]
        rows = torch.cat([mag * mag, mag * strict], dim=1)
    else:
        rows = mag * suffix
    out.copy_(rows[:, None, :].expand_as(out))
    unsafe = ~_rank_one_safe(f[:, :, 0], max_order)
    which = unsafe.any(1).nonzero()[:, 0]
    if not len(which):
        return
    f_u, unsafe = f[which], unsafe[which]
    fp = f_u
    for p in range(1, max_order + 1):
        if p > 1:
            fp = fp * f_u
        sel = unsafe[:, p - 1].nonzero()[:, 0]
        if len(sel):
            out[which[sel], p - 1] = _product_rows(fp[sel], p, separate_diagonal).double()


def _product_rows(fp: Tensor, p: int, separate_diagonal: bool) -> Tensor:
    """Order ``p`` statistics from the powers ``fp = F^p`` ``(n, ch, L)``."""
    g = torch.bmm(fp, fp.transpose(1, 2)).abs_().pow_(1.0 / p).triu_()
    return _triangle_rows(g, separate_diagonal)


def _block_stats(f: Tensor, max_order: int, separate_diagonal: bool, out: Tensor) -> None:
    """:func:`gram_stats` of ``f`` ``(n, ch, L)`` into ``out`` by blocks of samples
    (:data:`SAMPLE_BLOCK_BYTES`). With several bands (:data:`SPLIT_ROWS`), only the blocks
    holding the upper triangle are computed and rooted, then written into a matrix that is zero
    below the diagonal: the same coefficients, summed in the same order, as the whole product's
    upper triangle."""
    n, ch, length = f.shape
    per_sample = max(ch * length, ch * ch) * f.element_size()  # its activations or Gram matrix
    step = max(1, min(n, SAMPLE_BLOCK_BYTES // per_sample))
    bands = max(1, min(SPLIT_BANDS, ch // SPLIT_ROWS))
    edges = [round(b * ch / bands) for b in range(bands + 1)]
    upper = f.new_zeros((step, ch, ch)) if bands > 1 else None
    for start in range(0, n, step):
        fb = f[start : start + step]
        k = len(fb)
        fp = fb
        for p in range(1, max_order + 1):
            if p > 1:
                fp = fp * fb
            if upper is None:
                out[start : start + k, p - 1] = _product_rows(fp, p, separate_diagonal)
                continue
            g = upper[:k]
            for r0, r1 in zip(edges[:-1], edges[1:], strict=True):
                band = torch.bmm(fp[:, r0:r1], fp[:, r0:].transpose(1, 2))
                g[:, r0:r1, r0:] = band.abs_().pow_(1.0 / p).triu_()
            out[start : start + k, p - 1] = _triangle_rows(g, separate_diagonal)


def _triangle_rows(g: Tensor, separate_diagonal: bool) -> Tensor:
    """Row sums of Gram matrices ``g`` ``(n, ch, ch)`` that are zero below the diagonal, or their
    diagonal then the strict upper-triangle row sums (``g`` is modified). If a sum is not finite,
    the infinite coefficients become NaN first (rare)."""
    head = None
    if separate_diagonal:
        diagonal = g.diagonal(dim1=1, dim2=2)
        head = diagonal.clone()
        diagonal.zero_()
    rows = g.sum(2) if head is None else torch.cat([head, g.sum(2)], dim=1)
    if not bool(torch.isfinite(rows).all()):
        g.masked_fill_(torch.isinf(g), math.nan)
        if head is None:
            return g.sum(2)
        rows = torch.cat([head.masked_fill_(torch.isinf(head), math.nan), g.sum(2)], dim=1)
    return rows


def deviation(stats: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Relative deviation outside ``[low, high]``, elementwise (broadcasts).

    ``(low - v) / |low|`` below the band, ``(v - high) / |high|`` above it, 0 inside. A NaN or
    infinite ratio (a NaN statistic or edge, an edge equal to 0, an empty band ``[inf, -inf]``)
    counts as 0.
    """
    below = (low - stats) / low.abs()
    above = (stats - high) / high.abs()
    dev = torch.where(stats < low, below, torch.where(stats > high, above, 0.0))
    return dev.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


@register_score
class Gram(UsesLabels, BaseScore):
    """Gram-matrix score (Sastry & Oore), with quantile bands as in OODEEL.

    Per layer, Gram statistics of orders ``1..max_gram_order`` (:func:`gram_stats`). Channels: a
    per-sample activation of shape ``(C, H, W)`` has ``C`` channels of ``H W`` values; a 1-D or
    2-D one (logits, flattened features) is ONE channel of all its values (its Gram matrix is
    ``1 x 1``: ``||f||_{2p}^2`` per order). Per class ``c``, the band ``[low_c, high_c]`` is the
    ``(cut_off, 1 - cut_off)`` NaN-ignoring quantiles of the calibration samples grouped by
    ``calib_labels`` (predicted or true class). A sample's deviation for class ``c`` on a layer is
    the sum of its relative deviations outside the band (:func:`deviation`: NaN or infinite ratios
    count as 0), divided by the layer's expected deviation (the sum over calibration samples of
    their deviation from their own class band, over the number of calibration samples).
    Conformity for class ``c`` = ``-`` the sum over layers, where a NaN total becomes ``-inf``
    and an infinite one the most negative float (``torch.nan_to_num``).

    Gram products run in the activations' dtype (float32 for most networks): a coefficient that
    overflows is NaN and ignored (a NaN quantile or statistic deviates by 0), one that underflows
    is 0. A class without calibration sample has the empty band ``[inf, -inf]``: every sample's
    deviation from it is 0 (the most conforming value). If no calibration sample deviates on a
    layer (expected deviation 0), every conformity is ``-inf`` (or the most negative float).
    These situations raise :class:`~ood_core.diagnostics.OodLensWarning`.

    Options of our own (the defaults reproduce scio 1.1.1.2's Gram):

    * ``precision="float64"``: Gram products in float64, free of overflow (NaN, ignored) and
      underflow (0, a band edge at 0 that drops every deviation above it) up to high orders; e.g.
      with ``act_norm=2`` and ``max_gram_order=16`` the float32 products underflow on the
      ``tiniest`` model's middle block, float64 avoids it.
    * ``class_fallback="pooled"``: a class with fewer than 2 calibration samples uses the band of
      all calibration samples instead of its own (empty or single-point) band, so that OoD
      samples predicted as a class never seen at calibration are not maximally conforming
      (``tiniest`` calibrated without the class MNIST digits fall in: AUROC Fashion-MNIST vs
      MNIST 0.40 -> 0.92 on the logits).

    Bounds and memory: ``max_gram_order`` is at most :data:`MAX_GRAM_ORDER` (64). The
    calibration features (``n x P x S`` float64 per layer), the ``(chunk, ch, ch)`` Gram matrices
    (computed :data:`GRAM_BATCH_BYTES` at a time, at most half the memory limit, at least one
    sample) and the ``(chunk, C, P S)``
    deviation blocks of the scoring are estimated before any forward pass and refused, with the
    estimate, when they cannot fit (:func:`~ood_core.budget.check_budget`). A 3-D ``(N, L, D)``
    token output is one channel of ``L D`` values (a ``1 x 1`` Gram matrix per order).

    Sastry & Oore, "Detecting Out-of-Distribution Examples with Gram Matrices", ICML 2020.
    """

    family = "feature statistics"
    reference = "Sastry & Oore, ICML 2020"
    layer_rule = "any"
    suggested_layers = ("last_block", "penultimate", "logits")
    extract_params = ("max_gram_order", "separate_diagonal", "precision")
    params = (
        Param(
            "max_gram_order",
            "int",
            8,
            low=1,
            high=MAX_GRAM_ORDER,
            help=f"Highest Gram order P (at most {MAX_GRAM_ORDER}: beyond it the powers "
            "overflow or underflow for almost any activation; each order is one more Gram "
            "product per sample).",
        ),
        Param(
            "cut_off",
            "float",
            0.1,
            low=0,
            high=0.5,
            low_exclusive=True,
            high_exclusive=True,
            help="Quantile defining the per-class band [q(cut_off), q(1 - cut_off)].",
        ),
        Param("separate_diagonal", "bool", False, help="Gram diagonal as separate statistics."),
        Param(
            "calib_labels",
            "choice",
            "pred",
            choices=("pred", "true"),
            help="Group calibration samples by predicted or true class.",
        ),
        Param(
            "precision",
            "choice",
            "input",
            choices=tuple(PRECISIONS),
            help="Gram products in the activations' dtype (overflow -> ignored) or in float64.",
        ),
        Param(
            "class_fallback",
            "choice",
            "none",
            choices=("none", "pooled"),
            help="Band of classes with < 2 calibration samples: own (none) or pooled.",
        ),
    )

    @property
    def uses_labels(self) -> bool:
        return self.calib_labels == "true"

    # ------------------------------------------------------------------ memory
    def _n_stats(self, channels: int) -> int:
        """Statistics per sample and layer: ``P x S`` (``S = ch``, or ``2 ch`` with
        ``separate_diagonal``)."""
        return self.max_gram_order * channels * (2 if self.separate_diagonal else 1)

    def check_calibration(self, n_samples: int, class_counts: list[int] | None = None) -> None:
        """Before any forward pass: the float64 calibration features (``n x P x S`` per layer)
        and the scoring's deviation blocks must fit in memory."""
        super().check_calibration(n_samples, class_counts)
        rec = self.recorder_
        if rec is None or not self.layers:
            return
        device, dtype = net_device_dtype(rec.net)
        itemsize = (PRECISIONS[self.precision] or dtype).itemsize
        stats = []
        for layer in self.layers:
            size = tuple(rec.info(layer).output_size)
            channels = size[1] if len(size) == 4 else 1  # noqa: PLR2004
            stats.append(self._n_stats(channels))
            self._check_gram_memory(layer, n_samples, channels, itemsize, device)
        n_classes = per_sample_numel(rec.info((0, 1)).output_size)
        # the fit reads one class's rows at a time: the largest labelled class, or (predicted
        # classes are known only after the pass) at worst every sample in one class
        largest = n_samples
        if self.calib_labels == "true" and class_counts and not self._pools(class_counts):
            largest = max(class_counts)
        self._check_class_memory(largest, n_samples, max(stats), device)  # one layer at a time
        # the calibration statistics spill to disk past a budget
        check_spill_room(
            f"{type(self).__name__}: the Gram statistics of {n_samples:,} calibration samples "
            f"({sum(stats):,} each, max_gram_order={self.max_gram_order})",
            8 * n_samples * sum(stats),  # float64
            "lower max_gram_order or use fewer calibration samples",
        )
        self._check_deviation_memory(min(n_samples, CHUNK), n_classes, max(stats), device)

    def _check_gram_memory(
        self, layer: LayerId, n: int, channels: int, itemsize: int, device: torch.device | str
    ) -> int:
        """Refuse the ``(chunk, ch, ch)`` Gram matrices (x3) of ``n`` samples computed
        :data:`GRAM_BATCH_BYTES` (at most half the memory limit) at a time that cannot fit;
        return the chunk size."""
        per_sample = 3 * channels * channels * itemsize
        room = min(GRAM_BATCH_BYTES, memory_limit(device)[0] / 2)
        chunk = max(1, min(n, int(room // per_sample)))
        check_budget(
            f"{type(self).__name__} @ {layer_text(layer)}: the ({chunk:,}, {channels:,}, "
            f"{channels:,}) Gram matrices of {chunk:,} sample(s) at a time",
            chunk * per_sample,
            "use a layer with fewer channels",
            device,
        )
        return chunk

    def _check_deviation_memory(
        self, n_rows: int, n_classes: int, n_stats: int, device: torch.device
    ) -> None:
        check_budget(
            f"{type(self).__name__}: the ({n_rows:,}, {n_classes:,}, {n_stats:,}) float64 "
            "deviations from the class bands",
            4 * 8 * n_rows * n_classes * n_stats,  # below, above, where and the result
            "lower max_gram_order or use layers with fewer channels",
            device,
        )

    # ------------------------------------------------------------------ features
    def _channels_view(self, a: Tensor, layer: LayerId) -> Tensor:
        """``(n, channels, values)`` view of one layer's activations."""
        if not 2 <= a.ndim <= 4:  # noqa: PLR2004 (1-D to 3-D per sample)
            raise ValueError(
                f"Gram @ {layer_text(layer)}: per-sample activations must be 1-D, 2-D or 3-D, got "
                f"{a.ndim - 1}-D {tuple(a.shape[1:])}: pick another layer."
            )
        return a.reshape(a.shape[0], a.shape[1] if a.ndim == 4 else 1, -1)  # noqa: PLR2004

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        dtype = PRECISIONS[self.precision]
        chunks = {}
        for layer in self.layers:  # the (chunk, ch, ch) Gram matrices, before computing them
            f = self._channels_view(activations[layer], layer)
            itemsize = (dtype or f.dtype).itemsize if f.is_floating_point() else 8
            chunks[layer] = self._check_gram_memory(
                layer, f.shape[0], f.shape[1], itemsize, f.device
            )
        out = {}
        for layer in self.layers:
            f = self._channels_view(activations[layer], layer)
            step = max(1, chunks[layer])
            parts = [
                gram_stats(f[s : s + step], self.max_gram_order, self.separate_diagonal, dtype)
                for s in range(0, max(1, len(f)), step)
            ]
            out[layer_text(layer)] = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out

    def _layer_of(self, key: str) -> LayerId:
        d, i = key.split("-")
        return int(d), int(i)

    # ------------------------------------------------------------------ calibration
    fit_kind = "class-rows"

    def streams_fit(self) -> bool:
        return True  # the rows of one class at a time are all the fit needs

    def fit_state(self) -> ClassRows:
        return ClassRows("pred" if self.calib_labels == "pred" else "labels")

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        state = ClassRows("pred" if self.calib_labels == "pred" else "labels", math.inf)
        state.update(features, logits, labels)
        self._fit_from_state(state, logits, labels)

    def _fit_from_state(self, state: ClassRows, logits: Tensor, labels: Tensor) -> None:
        """Per layer and class: the band from the class's rows (float64; float32 -> float64 is
        exact), then every calibration sample's deviation from its own class band. One class's
        rows are read (from memory or disk) at a time, never the whole matrix."""
        try:
            self._fit_bands(state, logits)
        finally:
            state.close()

    def _fit_bands(self, state: ClassRows, logits: Tensor) -> None:
        n_classes = logits.shape[1]
        counts = state.class_counts() if state.n_classes else [0] * n_classes
        counts += [0] * (n_classes - len(counts))
        self._warn_sparse_classes(counts)
        q = torch.tensor(
            [self.cut_off, 1 - self.cut_off], dtype=torch.float64, device=logits.device
        )
        self.bounds: dict[str, tuple[Tensor, Tensor]] = {}
        self.expected: dict[str, Tensor] = {}
        sparse = self._pools(counts)
        for key, (shape, _) in state.shapes.items():
            layer = self._layer_of(key)
            n_orders, width = shape[0], math.prod(shape)
            self._warn_nan_counts(
                state.nan_columns[key],
                state.nan_rows[key],
                state.n,
                n_orders,
                layer,
                "calibration",
            )
            self._check_class_memory(
                state.n if sparse else max(counts), state.n, width, logits.device
            )
            low = torch.full(
                (n_classes, width), math.inf, dtype=torch.float64, device=logits.device
            )
            high = torch.full_like(low, -math.inf)
            pooled = None
            if sparse:  # the band of every calibration row (the one fit reading them all)
                pooled = self._rows(state.all_rows(key), logits.device).nanquantile(q, dim=0)
            total = low.new_zeros(())
            for c in range(n_classes):  # one class's rows at a time, never all
                if pooled is not None and counts[c] < 2:  # noqa: PLR2004
                    low[c], high[c] = pooled
                if not counts[c]:
                    continue
                rows = self._rows(state.rows(key, c), logits.device)
                if pooled is None or counts[c] >= 2:  # noqa: PLR2004
                    low[c], high[c] = rows.nanquantile(q, dim=0)
                # expected deviation: every calibration sample against its own class band
                total += deviation(rows, low[c], high[c]).sum()
            self.bounds[key] = (low, high)
            self._warn_zero_edges(high, counts, n_orders, layer)
            self.expected[key] = total / state.n
            if total == 0:
                degenerate(
                    self,
                    "no calibration sample deviates from its class band (expected "
                    "deviation 0), so every conformity is -inf or the most negative float",
                    "lower cut_off, use more calibration data or drop this layer",
                    layer=layer,
                )

    @staticmethod
    def _rows(rows: Tensor, device: torch.device) -> Tensor:
        return rows.flatten(1).to(device=device, dtype=torch.float64)

    def _pools(self, counts: list[int]) -> bool:
        """Whether the pooled band (read from every calibration row at once) is needed."""
        return self.class_fallback == "pooled" and min(counts) < 2  # noqa: PLR2004

    def _check_class_memory(self, n_rows: int, n: int, width: int, device: torch.device) -> None:
        """Refuse, before reading them, the float64 rows of the largest class (``n_rows`` of the
        ``n`` calibration samples; all of them for the pooled band) that cannot fit in memory:
        the rows, their sorted copy and their deviations."""
        which = "" if n_rows == n else f" (the {n_rows:,} of the largest class)"
        check_budget(
            f"{type(self).__name__}: the float64 Gram features of {n:,} calibration samples"
            f"{which} ({width:,} statistics each, max_gram_order={self.max_gram_order})",
            3 * 8 * n_rows * width,
            "lower max_gram_order, use fewer calibration samples or layers with fewer channels",
            device,
        )

    def _warn_sparse_classes(self, counts: list[int]) -> None:
        empty = [c for c, k in enumerate(counts) if k == 0]
        single = [c for c, k in enumerate(counts) if k == 1]
        if not empty and not single:
            return
        by = "predicted as" if self.calib_labels == "pred" else "labelled"
        parts = []
        if self.class_fallback == "pooled":
            parts.append(
                f"classes {empty + single} have fewer than 2 calibration samples {by} "
                "them and use the band of all calibration samples"
            )
        else:
            if empty:
                parts.append(
                    f"classes {empty} have no calibration sample {by} them: every "
                    "sample's deviation from them is 0: maximal conformity"
                )
            if single:
                parts.append(
                    f"classes {single} have a single calibration sample {by} them: "
                    "their band is that one point"
                )
        remedy = (
            "use more calibration data"
            + (", calib_labels='true'" if self.calib_labels == "pred" else "")
            + ("" if self.class_fallback == "pooled" else " or class_fallback='pooled'")
        )
        degenerate(self, "; ".join(parts), remedy)

    def _warn_nan(self, flat: Tensor, n_orders: int, layer: LayerId, where: str) -> None:
        nan = flat.isnan()
        self._warn_nan_counts(nan.any(0), int(nan.any(1).sum()), len(flat), n_orders, layer, where)

    def _warn_nan_counts(
        self, columns: Tensor, samples: int, n: int, n_orders: int, layer: LayerId, where: str
    ) -> None:
        """Warn when some of the ``n`` samples have NaN statistics: ``columns`` ``(P S,)`` says
        which flattened statistics hold a NaN, ``samples`` how many samples do."""
        if not samples:
            return
        per_order = columns.reshape(n_orders, -1).any(1)
        first = int(per_order.nonzero()[0]) + 1
        cause = "float64" if self.precision == "float64" else "the activations' dtype"
        remedy = "lower max_gram_order, set act_norm" + (
            " or precision='float64'" if self.precision == "input" else ""
        )
        problem = (
            f"Gram statistics of order >= {first} are NaN (overflow of {cause} or NaN "
            f"activations) for {samples} of {n} {where} samples; they count as zero "
            "deviation, so such samples look in-distribution"
        )
        degenerate(self, problem, remedy, layer=layer)

    def _warn_zero_edges(
        self, high: Tensor, counts: list[int], n_orders: int, layer: LayerId
    ) -> None:
        seen = torch.tensor([k > 0 for k in counts], device=high.device)
        zero = ((high == 0) & seen[:, None]).any(0).reshape(n_orders, -1)
        if self.separate_diagonal:  # the last channel has no strict upper triangle: always 0
            zero[:, -1] = False
        if not bool(zero.any()):
            return
        n_zero = int(zero.sum())
        problem = (
            f"{n_zero} of {high.shape[1]} Gram statistics have an upper band edge at 0 for some "
            "class (a dead channel or underflow at high orders): any deviation above it is an "
            "infinite ratio and counts as 0"
        )
        remedy = "a lower max_gram_order or another layer"
        if self.precision == "input":
            remedy = "precision='float64' (against underflow), " + remedy
        degenerate(self, problem, remedy, layer=layer)

    # ------------------------------------------------------------------ inference
    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        total = torch.zeros(
            logits.shape[0], logits.shape[1], dtype=torch.float64, device=logits.device
        )
        for key, stats in features.items():
            low, high = self.bounds[key]
            expected = self.expected[key]
            self._check_deviation_memory(
                min(len(stats), CHUNK), logits.shape[1], low.shape[1], logits.device
            )
            flat = stats.flatten(1).double()
            if bool(flat.isnan().any()):
                self._warn_nan(flat, stats.shape[1], self._layer_of(key), "scored")
            for start in range(0, len(flat), CHUNK):
                part = flat[start : start + CHUNK, None, :]
                dev = deviation(part, low[None], high[None]).sum(2)
                total[start : start + CHUNK] += dev / expected
        return -total.nan_to_num(nan=math.inf)


__all__ = ["Gram"]
