"""Activation-shaping scores: modify a layer's activations, recompute the logits from there.

Scope (documented restriction)
------------------------------
Recomputing "the rest of the network" from an arbitrary layer is not well defined for a general
``nn.Module`` (residual branches, normalisation after the layer...). These scores support the
case used by the papers and by almost every classifier: the chosen layer ``L`` feeds the network's
**final ``nn.Linear`` head** directly or through global average pooling and flattening. The head
(``W``, ``b``) is the last ``nn.Linear`` in the layer table whose output has the network's output
shape; ``L`` must be either

* the head itself: its **input** (the penultimate features) is shaped (not the logits), or
* a layer whose output, averaged over its spatial dims if 4-D (``(N, D, H, W) -> (N, D)``) and
  flattened, has the head's ``in_features`` values: the shaping is applied to that output and
  the logits are recomputed as ``W @ pool(shaped) + b``. This is exact when ``L`` is followed by
  average pooling + flatten + the head only (as in the bundled models, e.g. tiniest's (1, 10),
  (1, 11) and (1, 12)).

``check_layers`` raises a ``ValueError`` naming the layer otherwise, and every batch checks that
``W @ pool(unshaped output) + b`` reproduces the network's logits (unless ``act_norm`` is set),
so a layer followed by e.g. a normalisation or an activation is refused instead of scored wrongly.
``W`` and ``b`` are copied (float64) when the layers are checked, i.e. at each fit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ood_core.budget import check_budget
from ood_core.core import normalise_activation
from ood_core.layer_ids import layer_text
from ood_core.params import Param
from ood_core.recorder import LayerId, Recorder
from ood_core.scores.base import BaseScore, Features
from ood_core.scores.features import pool_features as pool_flat
from ood_core.scores.registry import register_score
from ood_core.scores.statistics import FeatureMeans

SKETCH_SIZE = 512
"""Values kept per calibration sample to estimate ReAct's threshold on a spatial map (see
:func:`quantile_sketch`)."""

REPRODUCTION_TOL = 1e-2
"""Allowed ``max |W pool(a) + b - logits|``, relative to ``1 + max |logits|``."""


# ---------------------------------------------------------------------------------- helpers
def order_statistic(values: Tensor, q: float, interpolation: str) -> float:
    """Quantile ``q`` of all ``values`` without interpolation: ``higher`` takes the sorted value
    at index ``ceil(q (n - 1))``, ``lower`` at ``floor(q (n - 1))`` (as ``torch.quantile`` with
    that ``interpolation``, without its 2**24-element limit)."""
    v = values.flatten()
    pos = q * (v.numel() - 1)
    nearest = round(pos)
    if abs(pos - nearest) < 1e-9:
        idx = nearest
    else:
        idx = math.ceil(pos) if interpolation == "higher" else math.floor(pos)
    return float(v.kthvalue(int(idx) + 1).values)


def quantile_sketch(a: Tensor, size: int = SKETCH_SIZE) -> Tensor:
    """Per-sample summary of ``a`` ``(n, ...)`` for estimating quantiles over all its values.

    When a sample has at most ``size`` values, they are all kept (quantiles are then exact).
    Otherwise each sample keeps its own order statistics at the ranks ``(j + 1/2) / size``
    (``j = 0..size-1``), each standing for ``1/size`` of the sample's values: quantiles of the
    pooled sketches are then within about ``1/size`` in rank (0.2 percentile point for 512) of
    the exact ones, deterministically, with ``size`` values per sample.
    """
    t = a.flatten(1)
    n = t.shape[1]
    if n <= size:
        return t
    idx = ((torch.arange(size, device=t.device, dtype=torch.float64) + 0.5) * n / size).long()
    return t.sort(dim=1).values[:, idx]


def keep_count(n: int, percentile: float) -> int:
    """Number of values kept above a per-sample percentile: ``n - round(n p / 100)`` (as in the
    ASH and SCALE reference code), at least 1."""
    return max(1, n - int(round(n * percentile / 100.0)))


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, 0 where ``den == 0``."""
    zero = den == 0
    return torch.where(
        zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den)
    )


def ash(a: Tensor, variant: str, percentile: float) -> Tensor:
    """ASH on each sample of ``a`` ``(n, ...)`` (float64): keep its ``keep_count`` largest values,
    zero the others; ``b``: set the kept ones to ``sum(original) / k``; ``s``: multiply the pruned
    sample by ``exp(sum(original) / sum(kept))`` (ratio 0 when the kept sum is 0)."""
    t = a.double().flatten(1)
    k = keep_count(t.shape[1], percentile)
    vals, idx = t.topk(k, dim=1)
    s1 = t.sum(1, keepdim=True)
    if variant == "b":
        vals = (s1 / k).expand_as(vals)
    out = torch.zeros_like(t).scatter_(1, idx, vals)
    if variant == "s":
        out = out * torch.exp(_safe_ratio(s1, vals.sum(1, keepdim=True)))
    return out.view(a.shape)


def scale_shaping(a: Tensor, percentile: float) -> Tensor:
    """SCALE on each sample of ``a`` ``(n, ...)`` (float64): multiply the whole (unpruned) sample
    by ``exp(sum(all values) / sum(its keep_count largest values))`` (ratio 0 when that is 0)."""
    t = a.double().flatten(1)
    k = keep_count(t.shape[1], percentile)
    s1 = t.sum(1, keepdim=True)
    s2 = t.topk(k, dim=1).values.sum(1, keepdim=True)
    return (t * torch.exp(_safe_ratio(s1, s2))).view(a.shape)


def energy(logits: Tensor) -> Tensor:
    """Negative free energy ``logsumexp(f)`` per sample (float64)."""
    return torch.logsumexp(logits.double(), dim=1)


# ---------------------------------------------------------------------------------- base class
class _ShapingScore(BaseScore):
    """Shared machinery: locate the head, read ``L``'s activations, recompute logits."""

    family = "activation shaping"
    layer_rule = "any"
    max_layers = 1
    suggested_layers = ("logits",)
    _head_w: Tensor | None = None
    _head_b: Tensor | None = None
    _use_input: bool = False
    _spatial: bool = False

    def check_layers(
        self, layers: tuple[LayerId, ...], recorder: Recorder | None = None
    ) -> tuple[LayerId, ...]:
        layers = super().check_layers(layers, recorder)
        if recorder is None:
            return layers
        name = type(self).__name__
        net_name = type(recorder.net).__name__
        head_id = recorder.head()
        if head_id is None:
            raise ValueError(
                f"{name} recomputes the logits through the network's final nn.Linear head, but "
                f"{net_name} has no nn.Linear layer producing its output (shape "
                f"{recorder.info((0, 1)).output_size}); it needs a classifier ending with a "
                "Linear layer."
            )
        head = recorder.info(head_id).module
        d = head.in_features
        (layer,) = layers
        info = recorder.info(layer)
        out = list(info.output_size)
        use_input = info.module is head
        spatial = False
        if not use_input:
            size = None
            if len(out) == 4:
                size, spatial = out[1], out[2] * out[3] > 1
            elif len(out) >= 2:
                size = math.prod(out[1:])
            if size != d:
                raise ValueError(
                    f"{name}: layer {layer_text(layer)} ({recorder.layer_name(layer) or net_name}, "
                    f"{info.type}, output {tuple(out[1:])}) cannot feed the final Linear head "
                    f"{layer_text(head_id)} ({recorder.layer_name(head_id)}, in_features={d}). {name} "
                    "recomputes the logits as W @ avgpool(shaped output) + b, so it needs the head "
                    f"itself {head_id} (its input, the penultimate features, is shaped) or a layer "
                    f"whose output, averaged over its spatial dims if 4-D and flattened, has {d} "
                    "values (e.g. the last feature map before the global average pooling)."
                )
        self._head_w = head.weight.detach().double().clone()
        bias = head.bias
        self._head_b = (
            bias.detach().double().clone()
            if bias is not None
            else torch.zeros(head.out_features, dtype=torch.float64, device=head.weight.device)
        )
        self._use_input = use_input
        self._spatial = spatial
        return layers

    def _head_params(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._head_w is None or self._head_b is None:
            raise RuntimeError(
                f"{self!r} has not located the network's head: fit it first (or "
                "call check_layers(layers, recorder))."
            )
        return self._head_w.to(device), self._head_b.to(device)

    def head(self, z: Tensor) -> Tensor:
        """Recomputed logits ``z @ W.T + b`` (float64) of pooled/flat features ``z`` (n, D)."""
        w, b = self._head_params(z.device)
        return z.double() @ w.T + b

    def read_layer(
        self, logits: Tensor, activations: dict[LayerId, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """``(a, z)``: the tensor to shape (``L``'s output, or the head's input when ``L`` is the
        head) and its unshaped pooled/flat features ``z`` (float64, (n, D)); checks that the head
        applied to ``z`` reproduces the network's logits."""
        (layer,) = self.layers
        if self._use_input:
            a = normalise_activation(activations.inputs[layer], self.act_norm)  # type: ignore[attr-defined]
        else:
            a = activations[layer]
        z = pool_flat(a)
        if not self._use_input and self.act_norm is None:
            ref = logits.double()
            diff = float((self.head(z) - ref).abs().max()) if len(ref) else 0.0
            if not diff <= REPRODUCTION_TOL * (1.0 + float(ref.abs().max())):
                raise ValueError(
                    f"{self!r}: the final Linear head applied to the average-pooled output of layer "
                    f"{layer_text(layer)} does not reproduce the network's logits (max abs difference "
                    f"{diff:.3g}); the layer must feed the head through average pooling and "
                    "flattening only. Use the last feature map before the global average pooling, "
                    "the pooling output or the head itself."
                )
        return a, z


# ---------------------------------------------------------------------------------- ReAct
@register_score
class ReAct(_ShapingScore):
    """ReAct: clip the activations of the layer ``L`` above ``c_high``, the ``percentile``-th
    percentile of all calibration activations of ``L`` (and below ``c_low``, the
    ``(100 - percentile)``-th, when ``symmetric``), recompute the logits ``f'`` through the head
    (see the module docstring); conformity ``softmax(f')`` per class (``output='softmax'``, the
    reference library's choice) or ``logsumexp(f')`` per sample (``output='energy'``, the
    paper's); higher = more in-distribution. The logits returned with it are the network's own.

    Thresholds use no interpolation (next value up for ``c_high``, down for ``c_low``, as the
    reference library). Choosing the head layer clips its input (the penultimate features), not
    the logits. Only one layer is supported, so ``per_layer`` (kept for parity with the reference
    library) has no effect. On a spatial map (e.g. ``(N, D, 7, 7)``) the clipping happens before
    the pooling, so the clipped pooled features are computed in the shared pass with the fitted
    thresholds (those features depend on the fit), and the thresholds are estimated from
    per-sample quantile sketches (:func:`quantile_sketch`: exact up to 512 values per sample,
    within about 0.2 percentile point beyond).

    Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations",
    NeurIPS 2021.
    """

    reference = "Sun, Guo & Li, NeurIPS 2021"
    extract_reads_fit = True  # at inference, the spatial path clips with the fitted thresholds
    params = (
        Param(
            "percentile",
            "float",
            90.0,
            low=0,
            low_exclusive=True,
            high=100,
            help="Percentile of the calibration activations used as the upper clipping threshold.",
        ),
        Param(
            "symmetric",
            "bool",
            False,
            help="Also clip below the (100 - percentile)-th percentile (needs percentile > 50).",
        ),
        Param(
            "per_layer",
            "bool",
            False,
            help="One threshold per layer (True) or over all layers (False); no effect here, "
            "as a single layer is used.",
        ),
        Param(
            "output",
            "choice",
            "softmax",
            choices=("softmax", "energy"),
            help="softmax of the clipped logits (per class) or their logsumexp (per sample).",
        ),
    )
    _thresholds: tuple[float | None, float] | None = None

    def check_params(self) -> None:
        if self.symmetric and self.percentile <= 50:
            raise ValueError(
                f"ReAct: parameter 'percentile' must be > 50 when symmetric=True (the "
                f"lower threshold is the (100 - percentile)-th percentile); got "
                f"{self.percentile!r}."
            )

    def _clip(self, a: Tensor) -> Tensor:
        assert self._thresholds is not None
        low, high = self._thresholds
        return a.clamp(min=low, max=high)

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        a, z = self.read_layer(logits, activations)
        if not self._spatial:
            return {"z": z}
        feats = {"sketch": quantile_sketch(a)}
        if self._thresholds is not None:
            feats["z_clipped"] = pool_flat(self._clip(a.double()))
        return feats

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        values = features["z"] if "z" in features else features["sketch"]
        q = self.percentile / 100.0
        high = order_statistic(values, q, "higher")
        low = order_statistic(values, 1.0 - q, "lower") if self.symmetric else None
        self._thresholds = (low, high)

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        if "z" in features:
            z = self._clip(features["z"].double())
        elif "z_clipped" in features:
            z = features["z_clipped"]
        else:
            raise RuntimeError(
                f"{self!r}: these features were extracted before the fit; extract "
                "them again (the clipped map needs the fitted thresholds)."
            )
        f = self.head(z)
        return torch.softmax(f, dim=1) if self.output == "softmax" else energy(f)


# ---------------------------------------------------------------------------------- ASH / SCALE
@register_score
class ASH(_ShapingScore):
    """ASH: per sample, keep the ``k = n - round(n percentile / 100)`` (at least 1) largest of
    the ``n`` activations of ``L`` and zero the others (``p``); ``b`` sets the kept ones to
    ``sum(original) / k``; ``s`` multiplies the pruned activations by
    ``exp(sum(original) / sum(kept))``; then conformity ``logsumexp(f')`` of the logits ``f'``
    recomputed through the head (per sample; higher = more in-distribution). No fitting.

    On a 4-D map the shaping is applied before the average pooling (the paper's code shapes the
    pooled ``(N, D, 1, 1)`` features: choose the pooling layer or the head for that). Like the
    paper, it assumes non-negative (post-ReLU) activations.

    Djurisic et al., "Extremely Simple Activation Shaping for Out-of-Distribution Detection",
    ICLR 2023.
    """

    reference = "Djurisic et al., ICLR 2023"
    needs_fit = False
    params = (
        Param(
            "variant",
            "choice",
            "s",
            choices=("p", "b", "s"),
            help="p: prune; b: prune and binarise; s: prune and scale (the paper's best).",
        ),
        Param(
            "percentile",
            "float",
            90.0,
            low=0,
            high=100,
            high_exclusive=True,
            help="Per-sample percentile below which activations are zeroed.",
        ),
    )

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        a, _ = self.read_layer(logits, activations)
        return {"z_shaped": pool_flat(ash(a, self.variant, self.percentile))}

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        return energy(self.head(features["z_shaped"]))


@register_score
class SCALE(_ShapingScore):
    """SCALE: per sample, multiply all the activations of ``L`` by ``exp(sum / sum of the top
    k)``, the top ``k = n - round(n percentile / 100)`` values (no pruning), then conformity
    ``logsumexp(f')`` of the logits recomputed through the head (per sample; higher = more
    in-distribution). No fitting. Assumes non-negative (post-ReLU) activations, like the paper.

    Xu et al., "Scaling for Training Time and Post-hoc Out-of-distribution Detection
    Enhancement", ICLR 2024.
    """

    reference = "Xu et al., ICLR 2024"
    needs_fit = False
    params = (
        Param(
            "percentile",
            "float",
            85.0,
            low=0,
            high=100,
            high_exclusive=True,
            help="Per-sample percentile defining the top values whose sum sets the scale.",
        ),
    )

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        a, _ = self.read_layer(logits, activations)
        return {"z_shaped": pool_flat(scale_shaping(a, self.percentile))}

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        return energy(self.head(features["z_shaped"]))


# ---------------------------------------------------------------------------------- DICE
@register_score
class DICE(_ShapingScore):
    """DICE: with ``m`` the mean calibration penultimate features (``L`` pooled and flattened, or
    the head's input), the contribution matrix ``V = W ⊙ m`` (``V_cj = W_cj m_j``); the head
    keeps the weights with the ``k = C D - round(C D sparsity)`` (at least 1) largest
    contributions and zeroes the others (``W'``); conformity ``logsumexp(W' z + b)`` (per sample;
    higher = more in-distribution). The paper's code keeps contributions strictly above their
    ``sparsity`` percentile; keeping the top ``k`` is the same up to ties and makes
    ``sparsity=0`` keep every weight (plain energy).

    Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection", ECCV 2022.
    """

    reference = "Sun & Li, ECCV 2022"
    params = (
        Param(
            "sparsity",
            "float",
            0.9,
            low=0,
            high=1,
            high_exclusive=True,
            help="Fraction of the head's weights zeroed (those of smallest contribution).",
        ),
    )

    extract_params = ()  # z is read unshaped: a parameter change costs no forward pass

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        _, z = self.read_layer(logits, activations)
        return {"z": z}

    fit_kind = "streaming"

    def streams_fit(self) -> bool:
        return True  # the mean of z is all the fit needs

    def fit_state(self) -> FeatureMeans:
        return FeatureMeans()

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        z = features["z"].double()
        self._fit_mean(z.mean(0))

    def _fit_from_state(self, state: FeatureMeans, logits: Tensor, labels: Tensor) -> None:
        self._fit_mean(state.mean("z"))

    def _fit_mean(self, mean: Tensor) -> None:
        """The mask of the head's weights from the calibration mean of ``z`` (float64)."""
        w, _ = self._head_params(mean.device)
        contrib = (w * mean[None, :]).flatten()
        k = max(1, contrib.numel() - int(round(contrib.numel() * self.sparsity)))
        mask = torch.zeros_like(contrib, dtype=torch.bool)
        mask[contrib.topk(k).indices] = True
        self.mask = mask.view(w.shape)

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        z = features["z"].double()
        w, b = self._head_params(z.device)
        return energy(z @ (w * self.mask.to(z.device)).T + b)


# ---------------------------------------------------------------------------------- fDBD
@register_score
class fDBD(_ShapingScore):  # noqa: N801 (the paper's name)
    """fDBD: with ``z`` the penultimate features (``L`` pooled and flattened, or the head's input),
    ``f = W z + b`` and ``c = argmax f``, conformity
    ``mean_{k != c} |f_c - f_k| / ||w_c - w_k|| / ||z - m||`` (per sample), the mean distance of
    ``z`` to the decision boundaries of the predicted class divided by its distance to the mean
    calibration features ``m``; higher = more in-distribution. Zero denominators are floored at
    1e-12. Nothing is shaped: it shares the head-locating machinery. The ``(C, C, D)`` float64
    differences of the head's weight rows are formed at every scoring call: their memory is
    checked before any forward pass and before they are computed.

    Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024.
    """

    family = "decision boundary"
    reference = "Liu & Qin, ICML 2024"

    extract_params = ()  # z is read unshaped: a parameter change costs no forward pass

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        _, z = self.read_layer(logits, activations)
        return {"z": z}

    def check_calibration(self, n_samples: int, class_counts: list[int] | None = None) -> None:
        super().check_calibration(n_samples, class_counts)
        if self._head_w is not None:
            self.check_memory(self._head_w.shape[0], self._head_w.shape[1])

    def check_memory(self, n_classes: int, dims: int) -> None:
        """Refuse the ``(C, C, D)`` float64 weight-row differences that cannot fit."""
        check_budget(
            f"{self!r}: the ({n_classes:,}, {n_classes:,}, {dims:,}) float64 differences of the "
            "head's weight rows",
            2 * 8 * n_classes * n_classes * dims,
            "use a head with fewer classes or features",
            self._head_w.device if self._head_w is not None else None,
        )

    fit_kind = "streaming"

    def streams_fit(self) -> bool:
        return True  # the mean of z is all the fit needs

    def fit_state(self) -> FeatureMeans:
        return FeatureMeans()

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        self.mean = features["z"].double().mean(0)

    def _fit_from_state(self, state: FeatureMeans, logits: Tensor, labels: Tensor) -> None:
        self.mean = state.mean("z")

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        z = features["z"].double()
        w, _ = self._head_params(z.device)
        self.check_memory(w.shape[0], w.shape[1])
        f = self.head(z)
        c = f.argmax(1, keepdim=True)
        gaps = (f.gather(1, c) - f).abs()  # (n, C), 0 at c
        w_dist = (w[:, None, :] - w[None, :, :]).norm(dim=2)  # (C, C)
        dist = gaps / w_dist[c.squeeze(1)].clamp_min(1e-12)
        n_other = max(1, f.shape[1] - 1)
        spread = (z - self.mean.to(z.device)).norm(dim=1).clamp_min(1e-12)
        return dist.sum(1) / n_other / spread


__all__ = ["ReAct", "ASH", "SCALE", "DICE", "fDBD"]
