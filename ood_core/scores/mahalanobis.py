"""Gaussian-feature scores: Mahalanobis distances to class-conditional Gaussians, and ViM.

DeepMahalanobis and RelativeMahalanobis, by default (``inverse="inv"``), compute what the
reference library computes. A layer's features are its whole activation flattened per sample
(``pooling="flatten"``; ``pooling="mean"`` first averages a 4-D ``(N, C, H, W)`` activation over
``H, W`` and 3-D ``(N, L, D)`` ViT tokens over the tokens, ``pooling="cls"`` keeps token 0 of 3-D
tokens: see :mod:`ood_core.scores.features`). Class means, the tied covariance (``torch.cov`` of the
class-centred features, normalised by ``n - 1``) and its LU inverse (``torch.linalg.inv_ex``) are
computed in the activations' dtype (float32 for half precision). When the inversion fails (an
exactly zero pivot, or a non-finite inverse) the precision matrix is NaN; a class without
calibration samples has a NaN mean. Squared distances ``(h - mu)^T P (h - mu)`` are evaluated in
float64 with ``P`` symmetrised (the quadratic form only sees its symmetric part), weighted and
summed over layers, and a NaN total reads as ``+inf`` (conformity ``-inf``).

A covariance with more feature dimensions than class-centred calibration samples (``D > n - K``,
``K`` classes seen) is singular. Its rounded LU inverse is then not an error but noise: the
conformities depend on the last bits of the activations, on the BLAS and on the thread count (on
the bundled model, the flattened ``(80, 7, 7)`` block from 1,000 samples gives rankings that
correlate ~0 between two thread counts). :func:`~ood_core.diagnostics.degenerate` warns; use
``pooling="mean"``, more calibration samples, or ``inverse="pinv"``.

Size and time. Before any forward pass, every layer's ``(n, D)`` calibration features and
``D x D`` covariance work are estimated (:func:`check_covariance_memory`, refused with the number
when they cannot fit), and a covariance of more than :data:`MAX_COVARIANCE_DIMS` dims is refused
whatever the memory, while one of more than :data:`SLOW_COVARIANCE_DIMS` is warned about: its
``O(D^3)`` inverse / eigendecomposition takes minutes to hours on a CPU. Every remedy names only
what applies to the layer's shape (:func:`~ood_core.scores.features.pooling_remedy`).

``inverse="pinv"`` (our robust fallback; also used by MultiMahalanobis with its own covariance):
float64 statistics; the covariance ``S`` is diagonalised (``torch.linalg.eigh``) and its condition
number ``|lambda|_max / |lambda|_min`` recorded (``inf`` when singular). When that is at most
``COND_MAX = 1e10`` (and ``S`` is positive definite) the exact inverse is used; otherwise the
pseudo-inverse that drops the eigen-directions with ``lambda <= lambda_max / COND_MAX``, i.e.
``torch.linalg.pinv(S, hermitian=True, rtol=1e-10)``. Distances are squared Euclidean distances
after whitening by ``V diag(lambda^-1/2)``, which never yields NaN or negative values. Classes
absent from the calibration labels get, per sample, the largest distance among the classes
present (so their conformity is the sample's lowest finite class conformity, never ``-inf``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import ood_core.scores.features as feat
from ood_core.budget import check_budget, net_device_dtype
from ood_core.core import normalise_activation
from ood_core.diagnostics import degenerate
from ood_core.layer_ids import layer_text
from ood_core.params import Param
from ood_core.recorder import LayerId, Recorder
from ood_core.scores.base import BaseScore, Features
from ood_core.scores.features import pool_features  # noqa: F401 (the former home of the name)
from ood_core.scores.labels import UsesLabels
from ood_core.scores.logits import fgm_direction
from ood_core.scores.registry import register_score
from ood_core.scores.statistics import ClassMoments

COND_MAX = 1e10
"""Largest condition number inverted exactly by ``inverse="pinv"``; above it the pseudo-inverse
(rtol 1/COND_MAX)."""
MAX_COVARIANCE_BYTES = 16 * 2**30
"""DeepMahalanobis / RelativeMahalanobis refuse a layer whose ``(D, D)`` covariance would exceed
this many bytes (e.g. a flattened (256, 56, 56) block: 2.3 TiB), with a clear error rather than
running out of memory."""
MAX_COVARIANCE_DIMS = 20_000
"""A layer of more feature dims is refused by the Mahalanobis scores before any forward pass,
whatever the memory: its ``D x D`` covariance is singular below ``D`` calibration samples and its
``O(D^3)`` float64 eigendecomposition takes hours on a CPU (measured on 2 cores: 10 s at 2,000
dims, 58 s at 4,000, i.e. ~2 h at 20,000)."""
SLOW_COVARIANCE_DIMS = 8_192
"""Above this many feature dims a covariance is warned about before any forward pass (minutes of
``O(D^3)`` work: ~8 min for a float64 eigendecomposition at 8,192 dims on 2 cores)."""
ILL_CONDITIONED = 0.1
"""``inverse="inv"`` warns when ``condition number * eps(dtype)`` exceeds this (the LU inverse then
has relative errors of that order; float32: condition numbers above ~8e5)."""

WEIGHTS = Param(
    "weights",
    "list",
    None,
    nullable=True,
    help="One weight w_l per layer, in the layers' order (None: all 1).",
)
EPSILON = Param(
    "epsilon",
    "float",
    0.0,
    low=0,
    help="Input preprocessing step size (0: none; Lee et al. tune it in [0, 0.005]).",
)
FGM_NORM = Param(
    "fgm_norm",
    "float",
    math.inf,
    low=1,
    allow_inf=True,
    help="p of the L^p-unit preprocessing step (inf: the gradient's sign).",
)
POOLING = feat.pooling_param(
    "flatten",
    "Layer features. flatten: the whole activation per sample (the reference's); mean: a 4-D "
    "(N, C, H, W) map averaged over H, W -> (N, C) (Lee et al.'s choice: far fewer dims, a "
    "well-posed covariance), 3-D (N, L, D) tokens (ViT / DeiT blocks) averaged over the L "
    "tokens -> (N, D); cls: token 0 of 3-D (N, L, D) tokens -> (N, D).",
)
MULTI_POOLING = feat.pooling_param(
    "mean",
    "Layer features (default mean): mean: a 4-D (N, C, H, W) map averaged over H, W -> (N, C), "
    "3-D (N, L, D) tokens (ViT / DeiT blocks) averaged over the L tokens -> (N, D); cls: token "
    "0 of 3-D tokens -> (N, D); flatten: the whole activation per sample.",
)
INVERSE = Param(
    "inverse",
    "choice",
    "inv",
    choices=("inv", "pinv"),
    help="Precision matrix. inv: LU inverse of the covariance in the activations' "
    "dtype (the reference's: rounding noise when singular, NaN when the LU "
    "fails); pinv: float64 pseudo-inverse (always finite).",
)
READOUT = Param(
    "readout",
    "choice",
    "predicted",
    choices=("predicted", "closest"),
    help="predicted: class c's conformity is -its own distance (the reference's; "
    "evaluation reads the predicted class); closest: every class gets -the "
    "closest class's distance, per layer (the papers' score).",
)


# ---------------------------------------------------------------------------------------- helpers
def _start_conformity(score: BaseScore, logits: Tensor) -> tuple[tuple, tuple, Tensor]:
    """The fitted ``(layers, weights)`` (checked against the score's current layers) and a zero
    ``(n, C)`` float64 accumulator."""
    layers, weights = score.fit_state_
    if tuple(score.layers) != layers:
        raise RuntimeError(
            f"{score!r} was fitted on layers {list(layers)} but now reads "
            f"{list(score.layers)}; fit it again."
        )
    total = torch.zeros(len(logits), logits.shape[1], dtype=torch.float64, device=logits.device)
    return layers, weights, total


def _key(layer: LayerId, perturbed: bool = False) -> str:
    return f"{'perturbed ' if perturbed else ''}{layer[0]}-{layer[1]}"


def _nan_to_inf(t: Tensor) -> Tensor:
    return t.masked_fill(t.isnan(), math.inf)


def work_dtype(t: Tensor) -> torch.dtype:
    """The dtype the reference computes statistics in: the activations' own, float32 for half
    precision (LU inversion needs single precision at least)."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def whitener(cov: Tensor) -> tuple[Tensor, float]:
    """``(W (D, r), condition number)`` with ``W W^T = cov^-1``, or, when the condition number
    exceeds :data:`COND_MAX` (or ``cov`` is not positive definite), ``W W^T =
    pinv(cov, hermitian=True, rtol=1/COND_MAX)`` (``r`` = the eigenvalues kept)."""
    cov = (cov.double() + cov.double().T) / 2
    evals, evecs = torch.linalg.eigh(cov)
    top = float(evals.abs().max()) if len(evals) else 0.0
    low = float(evals.abs().min()) if len(evals) else 0.0
    cond = top / low if low > 0 else math.inf
    if top == 0 or not math.isfinite(top):
        return evecs[:, :0], math.inf
    if cond <= COND_MAX and float(evals.min()) > 0:
        keep = torch.ones_like(evals, dtype=torch.bool)
    else:
        keep = evals > top / COND_MAX
    return evecs[:, keep] * evals[keep].rsqrt(), cond


def sq_dists(z: Tensor, centres: Tensor) -> Tensor:
    """Squared Euclidean distances ``(n, K)`` between rows of ``z`` and ``centres`` (exact
    differences, no ``|a|^2 + |b|^2 - 2ab`` cancellation)."""
    if z.shape[1] == 0:
        return z.new_zeros(len(z), len(centres))
    return torch.cdist(z, centres, compute_mode="donot_use_mm_for_euclid_dist").pow(2)


@dataclass
class Gaussians:
    """Gaussians sharing one covariance, kept in whitened coordinates (``inverse="pinv"`` and
    MultiMahalanobis).

    ``whiten`` ``(D, r)``: ``whiten @ whiten.T`` is the (pseudo-)inverse covariance; ``centres``
    ``(K, r)``: the whitened means of the ``present`` classes (``present``: ``(C,)`` bool).
    """

    whiten: Tensor
    centres: Tensor
    present: Tensor
    condition_number: float

    def sq_distances(self, h: Tensor) -> Tensor:
        """Squared Mahalanobis distances ``(n, C)``; absent classes get each row's largest."""
        d = sq_dists(h.double() @ self.whiten, self.centres)
        if bool(self.present.all()):
            return d
        out = d.new_empty(len(d), len(self.present))
        out[:, self.present] = d
        out[:, ~self.present] = d.max(1, keepdim=True).values
        return out

    def closest_sq_distance(self, h: Tensor) -> Tensor:
        """Differentiable ``min_c D^2_c(h)`` ``(n,)`` over the present classes."""
        z = h.double() @ self.whiten
        with torch.no_grad():
            idx = sq_dists(z, self.centres).argmin(1)
        return (z - self.centres[idx]).pow(2).sum(1)


@dataclass
class PrecisionGaussians:
    """Gaussians sharing one precision matrix, as the reference keeps them (``inverse="inv"``).

    ``means`` ``(C, D)``: NaN rows for classes without calibration samples; ``precision``
    ``(D, D)``: the inverse covariance computed in the activations' dtype, symmetrised, NaN when
    the inversion failed. Both stored in float64.
    """

    means: Tensor
    precision: Tensor
    condition_number: float

    def sq_distances(self, h: Tensor) -> Tensor:
        """``(h - mu_c)^T P (h - mu_c)`` ``(n, C)`` in float64 (NaN where a mean or the precision
        is NaN), expanded as ``hPh - 2 hP mu_c + mu_c P mu_c``."""
        h = h.double()
        hp = h @ self.precision
        mp = self.means @ self.precision
        return (hp * h).sum(1, keepdim=True) - 2 * hp @ self.means.T + (mp * self.means).sum(1)

    def closest_sq_distance(self, h: Tensor) -> Tensor:
        """Differentiable distance ``(n,)`` to the closest class (NaN distances never chosen)."""
        h = h.double()
        with torch.no_grad():
            idx = _nan_to_inf(self.sq_distances(h)).argmin(1)
        r = h - self.means[idx]
        return ((r @ self.precision) * r).sum(1)


def class_means(h: Tensor, labels: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """``(means (C, D), present (C,) bool)``; absent classes have a zero (unused) mean."""
    counts = torch.bincount(labels, minlength=n_classes).to(h.dtype)
    sums = h.new_zeros(n_classes, h.shape[1]).index_add_(0, labels, h)
    present = counts > 0
    return sums / counts.clamp_min(1)[:, None], present


def make_gaussians(cov: Tensor, means: Tensor, present: Tensor) -> Gaussians:
    w, cond = whitener(cov)
    return Gaussians(w, means[present] @ w, present, cond)


def covariance(residues: Tensor) -> Tensor:
    """``torch.cov`` of centred rows ``(n, D)`` as a ``(D, D)`` matrix (normalised by ``n - 1``;
    ``torch.cov`` also subtracts the residues' mean, ~0 here)."""
    d = residues.shape[1]
    return torch.cov(residues.T).reshape(d, d)


def reference_precision(
    owner: DeepMahalanobis, residues: Tensor, n_groups: int, layer: LayerId, what: str
) -> tuple[Tensor, float]:
    """``(precision (D, D) float64, condition number)`` of centred ``residues`` ``(n, D)``: the
    LU inverse of their covariance in the residues' dtype (NaN when it fails), symmetrised. The
    condition number (float64 eigenvalues of that covariance) is ``inf`` when it is singular:
    rank-deficient (``D > n - n_groups``) or not positive definite; warns when it is singular or
    too ill-conditioned for the dtype."""
    n, d = residues.shape
    cov = covariance(residues)
    inverse, info = torch.linalg.inv_ex(cov)
    failed = int(info) != 0 or not bool(inverse.isfinite().all())
    precision = torch.full_like(cov, math.nan) if failed else inverse
    precision = precision.double()
    precision = (precision + precision.T) / 2
    rank = n - n_groups
    cond = math.inf
    if not failed and d <= rank:
        evals = torch.linalg.eigvalsh(cov.double())
        low, top = float(evals.min()), float(evals.abs().max())
        cond = top / low if low > 0 else math.inf
    eps = torch.finfo(cov.dtype).eps
    dtype = str(cov.dtype).removeprefix("torch.")
    pooling = feat.owner_pooling_remedy(owner, (layer,))
    remedy = (
        f"try {pooling} or inverse='pinv'"
        if pooling
        else "calibrate on more samples, or try inverse='pinv'"
    )
    where = f"{what} covariance" if what else "covariance"
    if failed or d > rank:
        why = [f"rank <= {max(rank, 0):,}"] if d > rank else []
        if failed:
            why.append(f"its {dtype} LU inversion failed")
            effect = "every distance is NaN and every conformity -inf (as in the reference)"
        else:
            effect = (
                f"its {dtype} inverse is rounding noise, so the conformities are not "
                "reproducible (they change with the BLAS and the thread count)"
            )
        degenerate(
            owner,
            f"{d:,} feature dimensions for {n:,} samples, {where} singular "
            f"({'; '.join(why)}), {effect}",
            remedy,
            layer=layer,
            stacklevel=3,
        )
    elif cond * eps > ILL_CONDITIONED:
        degenerate(
            owner,
            f"{where} ill-conditioned (condition number {cond:.3g} for {dtype} "
            f"arithmetic, eps {eps:.2g}), so its inverse carries large rounding errors",
            remedy,
            layer=layer,
            stacklevel=3,
        )
    return precision, cond


@contextmanager
def _recording(recorder: Recorder, layers: Sequence[LayerId]) -> Iterator[None]:
    """Record ``layers`` on ``recorder`` inside the block, then restore its previous selection."""
    previous = recorder.recording
    recorder.record(*layers)
    try:
        yield
    finally:
        recorder.record(*previous)


def _check_calibration(owner: BaseScore, labels: Tensor, n_classes: int) -> None:
    if len(labels) < 2:
        raise ValueError(
            f"{owner!r} needs at least 2 calibration samples to estimate a "
            f"covariance; got {len(labels)}."
        )


def _layer_dims(recorder: Recorder, layer: LayerId, pooling: str) -> int:
    """Feature dims of a layer pooled by ``pooling`` (:func:`~ood_core.scores.features.
    pooled_size`)."""
    return feat.pooled_size(recorder.info(layer).output_size, pooling)


def check_covariance_memory(
    owner: BaseScore,
    layer: LayerId,
    n_samples: int,
    dims: int,
    itemsize: int,
    device: Any,
    matrices: int = 4,
) -> None:
    """Refuse (:class:`~ood_core.budget.BudgetError`) a layer whose calibration features
    ``(n, D)`` and ``(D, D)`` covariance work (``matrices`` float64 ``D x D`` matrices: the
    covariance, its inverse / eigendecomposition and copies; 4 by default, 5 with the global
    Gaussian of RelativeMahalanobis) cannot fit in memory; the remedy names the pooling that
    would shrink this layer, when one would."""
    remedy = feat.join_remedies(
        feat.owner_pooling_remedy(owner, (layer,)), "a smaller layer", "fewer calibration samples"
    )
    what = (
        f"{n_samples:,} x {dims:,} calibration features and their {dims:,} x {dims:,} covariance"
        if n_samples
        else f"the {dims:,} x {dims:,} streamed covariance"
    )
    check_budget(
        f"{owner!r} @ {layer_text(layer)}: {what}",
        n_samples * dims * itemsize + matrices * 8 * dims * dims,
        "use " + remedy,
        device,
    )


def check_covariance_time(owner: BaseScore, layer: LayerId, dims: int, output_size: Any) -> None:
    """Refuse (ValueError) a covariance of more than :data:`MAX_COVARIANCE_DIMS` feature dims
    whatever the memory, and warn (:class:`~ood_core.diagnostics.OodLensWarning`) above
    :data:`SLOW_COVARIANCE_DIMS`, naming the dims, the layer's output and the remedy."""
    if dims <= SLOW_COVARIANCE_DIMS:
        return
    remedy = "use " + feat.join_remedies(
        feat.owner_pooling_remedy(owner, (layer,)), "a smaller layer"
    )
    shape = feat.shape_text(output_size)
    pooling = owner.values.get("pooling")
    how = f" (pooling={pooling!r})" if pooling else ""
    if dims > MAX_COVARIANCE_DIMS:
        raise ValueError(
            f"{owner!r} @ {layer_text(layer)}: the output {shape} gives {dims:,} feature dims"
            f"{how}; a covariance of more than MAX_COVARIANCE_DIMS = {MAX_COVARIANCE_DIMS:,} "
            "dims is refused whatever the memory: it is singular below "
            f"{dims:,} calibration samples and its O(D^3) inverse / eigendecomposition takes "
            f"hours on a CPU (about 1 min at 4,000 dims); {remedy}."
        )
    degenerate(
        owner,
        f"the output {shape} gives {dims:,} feature dims{how}: the {dims:,} x {dims:,} "
        "covariance's O(D^3) inverse / eigendecomposition takes minutes to hours on a CPU "
        "(about 1 min at 4,000 dims, x8 per doubling)",
        remedy,
        layer=layer,
        stacklevel=3,
    )


class _LayerWeighted(UsesLabels, BaseScore):
    """Shared by the multi-layer Mahalanobis scores: pooled features and per-layer weights."""

    family = "mahalanobis"
    layer_rule = "any"
    relative: bool = False

    def check_calibration(self, n_samples: int, class_counts: list[int] | None = None) -> None:
        """Also refuses, before any forward pass, layers whose features and covariance cannot
        fit in memory, or whose covariance is too large to compute (warned when slow)."""
        super().check_calibration(n_samples, class_counts)
        rec = self.recorder_
        if rec is None:
            return
        device, dtype = net_device_dtype(rec.net)
        for layer in self.layers:
            size = rec.info(layer).output_size
            dims = _layer_dims(rec, layer, self.pooling)
            self.check_dims(dims, layer, tuple(size[1:]), dtype.itemsize)
            matrices = 5 if self.relative else 4
            kept = 0 if self.streams_fit() else n_samples  # streamed: no (n, D) features held
            check_covariance_memory(self, layer, kept, dims, 8, device, matrices)
            check_covariance_time(self, layer, dims, size)

    def check_dims(self, dims: int, layer: LayerId, shape: tuple, itemsize: int) -> None:
        """Hook: refuse a layer of ``dims`` feature dims (default: any is fine)."""

    def check_params(self) -> None:
        super().check_params()
        w = self.values.get("weights")
        if w is None:
            return
        bad = [
            v
            for v in w
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
        ]
        if not w or bad:
            raise ValueError(
                f"{type(self).__name__}: parameter 'weights' must be a non-empty "
                "list of finite floats, one per layer (or None); got "
                f"{list(w)!r}."
            )

    def layer_weights(self, layers: Sequence[LayerId] | None = None) -> list[float]:
        """``w_l`` per layer (all 1 by default); ValueError if their number != the layers'."""
        layers = tuple(self.layers if layers is None else layers)
        self.check_params()
        if self.weights is None:
            return [1.0] * len(layers)
        if len(self.weights) != len(layers):
            raise ValueError(
                f"{type(self).__name__}: parameter 'weights' has {len(self.weights)} "
                f"value(s) but the score reads {len(layers)} layer(s) "
                f"{[f'{d}-{i}' for d, i in layers]}; give one weight per layer, in "
                "the same order, or weights=None."
            )
        return [float(v) for v in self.weights]

    def check_layers(
        self, layers: Sequence[LayerId], recorder: Recorder | None = None
    ) -> tuple[LayerId, ...]:
        layers = super().check_layers(layers, recorder)
        self.layer_weights(layers)
        feat.check_score_pooling(self, recorder, layers)
        return layers

    def layer_features(self, a: Tensor, layer: LayerId | None = None) -> Tensor:
        """Per-sample feature vectors ``(N, D)`` of one layer's activation, pooled by
        ``pooling`` (:func:`~ood_core.scores.features.pool`), float64."""
        return feat.pool(a, self.pooling, torch.float64)

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        return {
            _key(layer): self.layer_features(activations[layer], layer) for layer in self.layers
        }


class _MomentsState:
    """The streaming fit state of DeepMahalanobis / RelativeMahalanobis (``inverse="pinv"``):
    per layer feature key, class moments by label and (relative) the moments of all rows."""

    def __init__(self, relative: bool) -> None:
        self.relative = relative
        self.by_class: dict[str, ClassMoments] = {}
        self.overall: dict[str, ClassMoments] = {}

    def update(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        for key, h in features.items():
            self.by_class.setdefault(key, ClassMoments(logits.shape[1])).update(h, labels)
            if self.relative:
                self.overall.setdefault(key, ClassMoments(1)).update(h, torch.zeros_like(labels))

    def merge(self, other: _MomentsState) -> None:
        for mine, theirs in ((self.by_class, other.by_class), (self.overall, other.overall)):
            for key, m in theirs.items():
                if key in mine:
                    mine[key].merge(m)
                else:
                    mine[key] = m


# ---------------------------------------------------------------------------------------- scores
@register_score
class DeepMahalanobis(_LayerWeighted):
    """Deep Mahalanobis: per layer ``l`` (features ``h_l``), class means ``mu_{l,c}`` of the
    calibration samples labelled ``c`` and one tied within-class covariance ``S_l`` (unbiased);
    ``D2_{l,c} = (h_l - mu_{l,c})^T S_l^-1 (h_l - mu_{l,c})``; conformity for class ``c`` =
    ``-sum_l w_l D2_{l,c}`` (weights default to 1), NaN read as ``-inf``.

    Readout. With the default ``readout="predicted"`` evaluation reads each sample's distance to
    its *predicted* class (argmax of the logits), as the reference library does; the papers score
    the distance to the *closest* class, ``-min_c D2_{l,c}`` per layer. ``readout="closest"``
    gives that: every class's conformity becomes ``-sum_l w_l min_c D2_{l,c}`` (the two differ
    when the closest Gaussian is not the predicted class; ``mode="diff"/"ratio"`` then see equal
    classes).

    Features. ``pooling="flatten"`` (default, the reference's) uses the whole activation, e.g.
    80 x 7 x 7 = 3,920 dims for a block of the bundled model: from 1,000 calibration samples its
    covariance is singular and, with the default ``inverse="inv"``, the conformities are
    rounding noise (not reproducible; a warning says so). ``pooling="mean"`` averages 4-D
    activations over space first (``(N, C)``, Lee et al.'s choice), which keeps the covariance
    well-posed. ``inverse="inv"`` (default) inverts the covariance by LU in the activations'
    dtype exactly as the reference does (NaN, hence ``-inf`` conformities, when that fails);
    ``inverse="pinv"`` uses float64 statistics and a pseudo-inverse that is always finite (see
    the module doc). Classes without calibration samples have a NaN mean, hence ``-inf``
    conformity (``pinv``: the sample's worst class distance); both are warned about.

    Input preprocessing. With ``epsilon > 0`` the input is moved, separately for each layer, by
    ``epsilon`` along the ``L^fgm_norm``-unit direction (:func:`fgm_direction`; the gradient's
    sign for ``fgm_norm=inf``) that decreases the distance to that layer's closest class
    (``min_c D2_{l,c}``); every class's ``D2_{l,c}`` is then read on the moved input (calibration
    statistics use clean inputs). Samples whose gradient is not finite stay unperturbed (the
    reference then skips the step for the whole batch), with a warning.

    Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
    Adversarial Attacks", NeurIPS 2018.
    """

    fit_note = "streaming with `inverse='pinv'`"
    reference = "Lee, Lee, Lee & Shin, NeurIPS 2018"
    params = (EPSILON, FGM_NORM, WEIGHTS, POOLING, INVERSE, READOUT)
    relative = False

    @property
    def needs_input_grad(self) -> bool:
        return self.epsilon > 0

    def layer_features(self, a: Tensor, layer: LayerId | None = None) -> Tensor:
        """The activation pooled per sample by ``pooling`` (flattened; ``mean`` over space or
        tokens; ``cls`` token: :func:`~ood_core.scores.features.pool`); float64 for
        ``inverse="pinv"``, else the activations' dtype (float32 for half precision).
        ValueError when its covariance would exceed :data:`MAX_COVARIANCE_BYTES`."""
        dtype = torch.float64 if self.inverse == "pinv" else work_dtype(a)
        h = feat.pool(a, self.pooling, dtype)
        self.check_dims(h.shape[1], layer, tuple(a.shape[1:]), h.element_size())
        return h

    def check_dims(self, dims: int, layer: LayerId | None, shape: tuple, itemsize: int) -> None:
        """ValueError when the ``(D, D)`` covariance of ``dims`` features would exceed
        :data:`MAX_COVARIANCE_BYTES` (checked before any forward pass, and on every batch)."""
        size = dims * dims * (8 if self.inverse == "pinv" else max(4, itemsize))
        if size > MAX_COVARIANCE_BYTES:
            where = f" @ {layer_text(layer)}" if layer is not None else ""
            remedy = feat.join_remedies(
                feat.pooling_remedy([(1, *shape)], self.pooling), "a smaller layer"
            )
            raise ValueError(
                f"{type(self).__name__}{where}: the activation {shape} "
                f"gives {dims:,} feature dims (pooling={self.pooling!r}), whose "
                f"covariance would take {size / 2**30:,.0f} GiB (limit "
                f"MAX_COVARIANCE_BYTES = {MAX_COVARIANCE_BYTES / 2**30:g} GiB); use "
                f"{remedy}."
            )

    def streams_fit(self) -> bool:
        """``inverse="pinv"`` fits from float64 class moments accumulated batch by batch
        (:class:`~ood_core.scores.statistics.ClassMoments`): the calibration features are never
        held (memory ``C x D + D x D`` per layer, not ``n x D``); the default ``"inv"`` keeps
        them, to compute the reference's float32 ``torch.cov`` exactly."""
        return self.inverse == "pinv"

    def fit_state(self) -> _MomentsState:
        return _MomentsState(self.relative)

    def _start_fit(self, labels: Tensor, n_classes: int) -> list[float]:
        """Checks, warnings and empty fitted state shared by both fits; the layer weights."""
        weights = self.layer_weights()
        _check_calibration(self, labels, n_classes)
        self.gaussians: list[Gaussians | PrecisionGaussians] = []
        self.global_gaussians: list[Gaussians | PrecisionGaussians] = []
        self.condition_numbers: dict[LayerId, float] = {}
        self.global_condition_numbers: dict[LayerId, float] = {}
        counts = torch.bincount(labels, minlength=n_classes)
        absent = [c for c in range(n_classes) if int(counts[c]) == 0]
        if absent:
            fill = (
                "their conformity is each sample's lowest class conformity"
                if self.inverse == "pinv"
                else "their means are NaN and their conformity -inf (as in the reference)"
            )
            degenerate(
                self,
                f"no calibration sample of class(es) {absent}",
                f"{fill}; calibrate with samples of every class (or use readout='closest')",
            )
        return weights

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        n_classes = logits.shape[1]
        weights = self._start_fit(labels, n_classes)
        fit_layer = self._fit_pinv if self.inverse == "pinv" else self._fit_inv
        for layer in self.layers:
            fit_layer(layer, features[_key(layer)], labels, n_classes)
        self.fit_state_ = (tuple(self.layers), weights)

    def _fit_from_state(self, state: _MomentsState, logits: Tensor, labels: Tensor) -> None:
        weights = self._start_fit(labels, logits.shape[1])
        for layer in self.layers:
            m = state.by_class[_key(layer)]
            self._add_pinv(layer, make_gaussians(m.covariance(), m.means, m.present()), "")
            if self.relative:
                m0 = state.overall[_key(layer)]
                self._add_pinv(
                    layer, make_gaussians(m0.covariance(), m0.means, m0.present()), "global "
                )
        self.fit_state_ = (tuple(self.layers), weights)

    def _add_pinv(self, layer: LayerId, g: Gaussians, what: str) -> None:
        """Keep a layer's fitted Gaussians (``what``: ``""`` per class, ``"global "``)."""
        if what:
            self.global_gaussians.append(g)
            self.global_condition_numbers[layer] = g.condition_number
        else:
            self.gaussians.append(g)
            self.condition_numbers[layer] = g.condition_number
        self._warn_pinv(layer, g, what)

    def _fit_inv(self, layer: LayerId, h: Tensor, labels: Tensor, n_classes: int) -> None:
        h = h.to(work_dtype(h))
        counts = torch.bincount(labels, minlength=n_classes).to(h.dtype)
        sums = h.new_zeros(n_classes, h.shape[1]).index_add_(0, labels, h)
        means = sums / counts[:, None]  # 0 / 0 = NaN for absent classes
        n_present = int((counts > 0).sum())
        precision, cond = reference_precision(self, h - means[labels], n_present, layer, "")
        self.gaussians.append(PrecisionGaussians(means.double(), precision, cond))
        self.condition_numbers[layer] = cond
        if self.relative:
            mu0 = h.mean(0, keepdim=True)
            precision0, cond0 = reference_precision(self, h - mu0, 1, layer, "global")
            self.global_gaussians.append(PrecisionGaussians(mu0.double(), precision0, cond0))
            self.global_condition_numbers[layer] = cond0

    def _fit_pinv(self, layer: LayerId, h: Tensor, labels: Tensor, n_classes: int) -> None:
        h = h.double()
        means, present = class_means(h, labels, n_classes)
        self._add_pinv(layer, make_gaussians(covariance(h - means[labels]), means, present), "")
        if self.relative:
            mu0 = h.mean(0, keepdim=True)
            g0 = make_gaussians(
                covariance(h - mu0), mu0, torch.ones(1, dtype=torch.bool, device=h.device)
            )
            self._add_pinv(layer, g0, "global ")

    def _warn_pinv(self, layer: LayerId, g: Gaussians, what: str) -> None:
        if g.condition_number <= COND_MAX:
            return
        d, kept = g.whiten.shape
        degenerate(
            self,
            f"{what}covariance singular or ill-conditioned (condition number "
            f"{g.condition_number:.3g} > {COND_MAX:.0e}): the pseudo-inverse ignores "
            f"{d - kept:,} of its {d:,} directions",
            "try " + feat.join_remedies(pooling, "more calibration samples")
            if (pooling := feat.owner_pooling_remedy(self, (layer,)))
            else "calibrate on more samples",
            layer=layer,
            stacklevel=3,
        )

    def _layer_distance(self, i: int, h: Tensor) -> Tensor:
        d = self.gaussians[i].sq_distances(h)
        if self.relative:
            d = d - self.global_gaussians[i].sq_distances(h)
        return d

    def _closest_distance(self, i: int, h: Tensor) -> Tensor:
        d = self.gaussians[i].closest_sq_distance(h)
        if self.relative:  # D2_0 does not depend on the class: same closest class
            d = d - self.global_gaussians[i].closest_sq_distance(h)
        return d

    def _can_perturb(self) -> bool:
        state = self.__dict__.get("fit_state_")
        return bool(self.fitted and state is not None and state[0] == tuple(self.layers))

    def extract_own(self, recorder: Recorder, x: Tensor) -> Features:
        """Clean features (used for calibration) and, once fitted, the features of each layer on
        the input moved by ``epsilon`` to decrease that layer's closest-class distance."""
        layers = tuple(self.layers)
        xg = x.detach().clone().requires_grad_(True)
        with _recording(recorder, layers), torch.enable_grad():
            recorder(xg)
            feats = [
                self.layer_features(
                    normalise_activation(recorder.activations[layer], self.act_norm), layer
                )
                for layer in layers
            ]
        out = {_key(layer): f.detach() for layer, f in zip(layers, feats, strict=True)}
        if not self._can_perturb():
            return out  # calibration pass: statistics are estimated on clean inputs
        for i, layer in enumerate(layers):
            objective = -self._closest_distance(i, feats[i]).sum()
            (grad,) = torch.autograd.grad(
                objective, xg, retain_graph=i + 1 < len(layers), allow_unused=True
            )
            if grad is None:
                grad = torch.zeros_like(x)
            bad = int((~grad.flatten(1).isfinite().all(1)).sum())
            if bad:
                degenerate(
                    self,
                    f"the input gradient is not finite for {bad} of {len(x)} "
                    "samples (NaN precision or activations)",
                    "those samples are scored without the epsilon step",
                    layer=layer,
                )
            x_moved = x.detach() + self.epsilon * fgm_direction(grad, self.fgm_norm)
            with _recording(recorder, (layer,)), torch.no_grad():
                recorder(x_moved)
                a = normalise_activation(recorder.activations[layer], self.act_norm)
                out[_key(layer, perturbed=True)] = self.layer_features(a, layer)
        return out

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        layers, weights, _ = _start_conformity(self, logits)
        per_layer = []
        for i, layer in enumerate(layers):
            key = _key(layer, perturbed=self.epsilon > 0)
            if key not in features:
                raise RuntimeError(
                    f"{self!r}: features {key!r} are missing (epsilon > 0 needs the "
                    "perturbed pass of a fitted score); fit it again."
                )
            d = self._layer_distance(i, features[key])
            if self.readout == "closest":
                d = _nan_to_inf(d).min(1).values
            per_layer.append(d)
        w = torch.tensor(weights, dtype=torch.float64, device=logits.device)
        total = torch.stack(per_layer, -1) @ w  # (n, C), or (n,) for the closest class
        return -torch.nan_to_num(total, nan=math.inf)


@register_score
class RelativeMahalanobis(DeepMahalanobis):
    """Relative Mahalanobis: as :class:`DeepMahalanobis` (same parameters, features, inversion,
    readout and preprocessing) but each layer's class distance is compared with the distance
    ``D2_{l,0}`` to one Gaussian fitted on all calibration samples (global mean, its own
    covariance): conformity for class ``c`` = ``-sum_l w_l (D2_{l,c} - D2_{l,0})``.
    ``readout="closest"`` gives the paper's ``-min_c (D2_{l,c} - D2_{l,0})`` per layer (the
    default reads the predicted class, as the reference). ``epsilon > 0`` moves the input to
    decrease ``min_c D2_{l,c} - D2_{l,0}`` per layer.

    Ren et al., "A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection", arXiv
    2106.09022, 2021.
    """

    reference = "Ren et al., arXiv 2021"
    relative = True


class _ShrinkageParam(Param):
    """``'ledoit_wolf'``, ``'oas'`` or a float in [0, 1] (fixed shrinkage)."""

    def range_text(self) -> str:
        return "'ledoit_wolf', 'oas' or a float in [0, 1]"

    def validate(self, value: Any, owner: str) -> Any:
        where = f"{owner}: parameter {self.name!r}"
        if isinstance(value, str):
            name = value.strip().lower().replace("-", "_")
            if name in ("ledoit_wolf", "oas"):
                return name
            try:
                value = float(name)
            except ValueError:
                raise ValueError(f"{where} must be {self.range_text()}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
            raise ValueError(f"{where} must be {self.range_text()}, got {value!r}")
        return float(value)


@register_score
class MultiMahalanobis(_LayerWeighted):
    """Multi-layer Mahalanobis with shrunk covariances: per layer ``l``, class means and one
    covariance of the class-centred calibration features shrunk toward the scaled identity
    ``(1 - s) S + s tr(S)/D I`` (``s`` estimated by Ledoit-Wolf or OAS, or the given float); the
    squared distances ``D2_{l,c}`` are standardised by the mean ``m_l`` and std ``s_l`` of the
    calibration samples' distances to their own (label) class, ``z_{l,c} = (D2_{l,c} - m_l) /
    s_l``; conformity for class ``c`` = ``-sum_l w_l z_{l,c}`` (per class). Evaluation reads the
    predicted class; ``readout="closest"`` gives every class ``-sum_l w_l min_c z_{l,c}`` (the
    closest class per layer, as Lee et al. score). Features: ``pooling="mean"`` by default (4-D
    maps averaged over space, 3-D ViT tokens over the tokens; ``cls`` / ``flatten`` on request,
    see :mod:`ood_core.scores.features`), statistics in float64 (whitened, see the module doc).

    Ledoit & Wolf, "A well-conditioned estimator for large-dimensional covariance matrices", J.
    Multivariate Analysis 2004; Lee et al., "A Simple Unified Framework for Detecting
    Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018.
    """

    reference = "Ledoit & Wolf, JMVA 2004; Lee et al., NeurIPS 2018"
    params = (
        _ShrinkageParam(
            "shrinkage",
            "str",
            "ledoit_wolf",
            help="Covariance shrinkage: 'ledoit_wolf', 'oas' or a fixed float in [0, 1].",
        ),
        WEIGHTS,
        READOUT,
        MULTI_POOLING,
    )

    def shrunk_covariance(self, centred: Tensor) -> tuple[Tensor, float]:
        """``(covariance, shrinkage used)`` of already centred features ``(n, D)``."""
        s = self.shrinkage
        if isinstance(s, str):
            from sklearn.covariance import OAS, LedoitWolf

            est = (LedoitWolf if s == "ledoit_wolf" else OAS)(assume_centered=True)
            est.fit(centred.cpu().numpy())
            cov = torch.from_numpy(est.covariance_).to(centred)
            return cov, float(est.shrinkage_)
        emp = centred.T @ centred / len(centred)
        mu = torch.trace(emp) / emp.shape[0]
        eye = torch.eye(emp.shape[0], dtype=emp.dtype, device=emp.device)
        return (1 - s) * emp + s * mu * eye, s

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        weights = self.layer_weights()
        n_classes = logits.shape[1]
        _check_calibration(self, labels, n_classes)
        self.gaussians: list[Gaussians] = []
        self.condition_numbers: dict[LayerId, float] = {}
        self.shrinkages: dict[LayerId, float] = {}
        self.standardisation: dict[LayerId, tuple[float, float]] = {}
        for layer in self.layers:
            h = features[_key(layer)].double()
            means, present = class_means(h, labels, n_classes)
            cov, used = self.shrunk_covariance(h - means[labels])
            g = make_gaussians(cov, means, present)
            own = g.sq_distances(h).gather(1, labels[:, None]).squeeze(1)
            m, sd = float(own.mean()), float(own.std(correction=0))
            self.gaussians.append(g)
            self.condition_numbers[layer] = g.condition_number
            self.shrinkages[layer] = used
            self.standardisation[layer] = (m, sd if sd > 1e-12 * max(1.0, abs(m)) else 1.0)
        self.fit_state_ = (tuple(self.layers), weights)

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        layers, weights, total = _start_conformity(self, logits)
        if self.readout == "closest":
            total = total[:, 0]
        for g, layer, w in zip(self.gaussians, layers, weights, strict=True):
            m, sd = self.standardisation[layer]
            z = (g.sq_distances(features[_key(layer)]) - m) / sd
            total -= w * (z.min(1).values if self.readout == "closest" else z)
        return total


def vim_default_dim(n_features: int) -> int:
    """The ViM paper's principal-subspace size: 1000 for D >= 2048, 512 for D >= 768, else
    D // 2."""
    if n_features >= 2048:
        return 1000
    if n_features >= 768:
        return 512
    return max(1, n_features // 2)


@register_score
class ViM(BaseScore):
    """Virtual-logit Matching on the final ``nn.Linear`` layer (give its id; ViM reads its input
    ``h``, its output logits ``f`` and its weight ``W``/bias ``b``): origin ``o = -pinv(W) b``;
    principal subspace: the top-``dim`` eigenvectors of ``(h - o)^T (h - o) / n`` on calibration;
    residual ``r(x) = ||P_perp (h - o)||``; ``alpha = mean_i max_c f_ic / mean_i r_i`` on
    calibration; conformity ``logsumexp(f) - alpha * r(x)`` (per sample; the log-odds of the
    real classes against the virtual logit ``alpha r``, so higher = more in-distribution).
    ``dim=None``: 1000 if D >= 2048, 512 if D >= 768, else D // 2 (the paper's rule).

    Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022.
    """

    family = "feature statistics"
    reference = "Wang, Li, Feng & Zhang, CVPR 2022"
    layer_rule = "any"
    max_layers = 1
    suggested_layers = ("logits",)
    params = (
        Param(
            "dim",
            "int",
            None,
            low=1,
            nullable=True,
            help="Principal subspace size (None: the paper's rule from the feature dim).",
        ),
    )

    def _check_act_norm(self) -> None:
        if self.act_norm is not None:
            raise ValueError(
                "ViM: parameter 'act_norm' must be None: ViM uses the final Linear "
                "layer's raw input and its weights."
            )

    def check_params(self) -> None:
        super().check_params()
        self._check_act_norm()

    def check_layers(
        self, layers: Sequence[LayerId], recorder: Recorder | None = None
    ) -> tuple[LayerId, ...]:
        layers = super().check_layers(layers, recorder)
        self._check_act_norm()
        if recorder is not None:
            (layer,) = layers
            module = recorder.info(layer).module
            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"ViM needs the final nn.Linear layer (the one producing the "
                    f"logits from the penultimate features); {layer_text(layer)} "
                    f"({recorder.layer_name(layer) or 'the network'}) is a "
                    f"{type(module).__name__}. Give the Linear layer's "
                    "id."
                )
            head = recorder.head()
            if layer != head:
                where = (
                    f"the head is {layer_text(head)} ({recorder.layer_name(head)})"
                    if head is not None
                    else "no nn.Linear layer produces the network's output (e.g. two heads "
                    "averaged), so ViM does not apply to this network"
                )
                raise ValueError(
                    f"ViM @ {layer_text(layer)}: the output of "
                    f"{recorder.layer_name(layer) or 'this layer'} is not the network's output, "
                    f"so its logits are not the ones the network returns: {where}."
                )
            w = module.weight.detach().double().clone()
            b = (
                module.bias.detach().double().clone()
                if module.bias is not None
                else w.new_zeros(w.shape[0])
            )
            self.__dict__["_linear"] = (w, b)
        return layers

    def check_calibration(self, n_samples: int, class_counts: list[int] | None = None) -> None:
        """Also refuses, before any forward pass, features and a ``(D, D)`` eigenproblem that
        cannot fit in memory."""
        super().check_calibration(n_samples, class_counts)
        linear = self.__dict__.get("_linear")
        if self.recorder_ is not None and linear is not None and self.layers:
            device = net_device_dtype(self.recorder_.net)[0]
            d = linear[0].shape[1]
            check_covariance_memory(self, self.layers[0], n_samples, d, 8, device)

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        (layer,) = self.layers
        h = activations.inputs[layer]  # type: ignore[attr-defined]
        if h.ndim != 2:
            raise ValueError(
                f"ViM needs a Linear layer applied to (N, D) features; the input of "
                f"{layer_text(layer)} has shape {tuple(h.shape)}."
            )
        return {"h": h, "f": activations[layer]}  # kept in the net's dtype (cast at use)

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        if "_linear" not in self.__dict__:
            raise ValueError(
                "ViM reads the Linear layer's weights from the network: fit it "
                "through the Engine or score.fit(rnet, ...)."
            )
        w, b = self.__dict__["_linear"]
        h, f = features["h"].double(), features["f"].double()
        n, d = h.shape
        if w.shape[1] != d:
            raise ValueError(
                f"ViM: the Linear layer takes {w.shape[1]} features but its recorded input has {d}."
            )
        if n < 2:
            raise ValueError(f"{self!r} needs at least 2 calibration samples; got {n}.")
        dim = self.dim if self.dim is not None else vim_default_dim(d)
        if dim >= d:
            raise ValueError(
                f"ViM: parameter 'dim' ({dim}) must be smaller than the feature "
                f"dimension {d} (the residual lives in the other D - dim "
                f"directions); use dim <= {d - 1}."
            )
        w, b = w.to(h.device), b.to(h.device)
        self.origin = -torch.linalg.pinv(w) @ b
        centred = h - self.origin
        evals, evecs = torch.linalg.eigh(centred.T @ centred / n)
        order = evals.argsort(descending=True)
        self.principal_space = evecs[:, order[:dim]]
        self.null_space = evecs[:, order[dim:]]
        self.dim_used = dim
        residual = self.residual(h)
        mean_res = float(residual.mean())
        if not mean_res > 0:
            raise ValueError(
                f"ViM: the calibration features lie inside the {dim}-dim principal "
                "subspace (zero residual); use a smaller 'dim'."
            )
        self.alpha = float(f.max(1).values.mean()) / mean_res

    def residual(self, h: Tensor) -> Tensor:
        """``||P_perp (h - o)||`` ``(n,)``: the norm of the features outside the principal space."""
        return ((h.double() - self.origin) @ self.null_space).norm(dim=1)

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        f = features["f"].double()
        return torch.logsumexp(f, dim=1) - self.alpha * self.residual(features["h"])


__all__ = ["DeepMahalanobis", "RelativeMahalanobis", "MultiMahalanobis", "ViM"]
