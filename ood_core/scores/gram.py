"""Gram-matrix deviations (Sastry & Oore)."""

from __future__ import annotations

import torch
from torch import Tensor

from ood_core.params import Param
from ood_core.recorder import LayerId
from ood_core.scores.base import BaseScore, Features

EPS = 1e-6
F32_SAFE_MAX = 8.0
"""Largest ``|activation|`` for float32 Gram products: ``(8^16)^2 * 4096 ~ 3e32 < 3.4e38``."""


def gram_stats(a: Tensor, max_order: int, separate_diagonal: bool = False) -> Tensor:
    """Gram statistics of one layer's activations ``a`` ``(n, ch, ...)`` -> ``(n, P, S)``.

    For ``p = 1..P`` with ``F`` the activations reshaped to ``(ch, HW)``:
    ``G_p = |F^p (F^p)^T|^(1/p)`` (elementwise power and root), then the row sums of its upper
    triangle (diagonal included) -> ``S = ch`` values; with ``separate_diagonal`` the diagonal and
    the strict upper-triangle row sums -> ``S = 2 ch``. The products ``F^p (F^p)^T`` run in float32
    when every ``|a| <= F32_SAFE_MAX`` (no overflow up to order 16; relative error ~1e-5, far below
    the spread of the calibration quantiles) and in float64 otherwise; results are float64.
    Rank-one activations (one value per channel) use the exact closed form ``|f_i| sum_{j>=i} |f_j|``.
    """
    dtype = torch.float32 if float(a.detach().abs().max()) <= F32_SAFE_MAX else torch.float64
    f = a.detach().to(dtype).reshape(a.shape[0], a.shape[1], -1)
    ch = f.shape[1]
    if f.shape[2] == 1 and not separate_diagonal:
        # rank one (e.g. pooled features, logits): |f_i^p f_j^p|^(1/p) = |f_i f_j| for every p,
        # so the row sums of the upper triangle are |f_i| * sum_{j >= i} |f_j|
        v = f[:, :, 0].double().abs()
        rows = v * v.flip(1).cumsum(1).flip(1)
        return rows[:, None, :].expand(-1, max_order, -1).contiguous()
    mask = torch.ones(ch, ch, dtype=dtype, device=a.device).triu(1 if separate_diagonal else 0)
    out = []
    fp = f
    for p in range(1, max_order + 1):
        if p > 1:
            fp = fp * f  # F^p built incrementally
        g = torch.bmm(fp, fp.transpose(1, 2)).abs_().pow_(1.0 / p)
        rows = (g * mask).sum(2)
        if separate_diagonal:
            rows = torch.cat([g.diagonal(dim1=1, dim2=2), rows], dim=1)
        out.append(rows.double())
    return torch.stack(out, dim=1)


def deviation(stats: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Relative deviation outside ``[low, high]``: ``(low - v)/|low|`` below, ``(v - high)/|high|``
    above, 0 inside (denominators floored at 1e-6). Broadcasts; returns the input shape."""
    below = (low - stats).clamp_min(0) / low.abs().clamp_min(EPS)
    above = (stats - high).clamp_min(0) / high.abs().clamp_min(EPS)
    return below + above


class Gram(BaseScore):
    """Gram-matrix score: per layer, Gram statistics of orders 1..P (see :func:`gram_stats`); per
    class ``c`` the calibration quantiles ``low = q(cut_off)`` and ``high = q(1 - cut_off)`` of the
    samples labelled ``c`` (``calib_labels``: predicted or true labels); the deviation of a sample
    outside ``[low_c, high_c]`` (:func:`deviation`) summed per layer and divided by that layer's
    mean calibration deviation; conformity for class ``c`` = ``-sum over layers`` (per class).

    Sastry & Oore, "Detecting Out-of-Distribution Examples with Gram Matrices", ICML 2020.
    """

    family = "feature statistics"
    reference = "Sastry & Oore, ICML 2020"
    layer_rule = "any"
    suggested_layers = ("last_block", "penultimate", "logits")
    params = (
        Param("max_gram_order", "int", 8, low=1, high=16, help="Highest Gram order P."),
        Param("cut_off", "float", 0.1, low=0, high=0.5, high_exclusive=True,
              help="Quantile defining the per-class [low, high] band."),
        Param("separate_diagonal", "bool", False, help="Keep the Gram diagonal as separate statistics."),
        Param("calib_labels", "choice", "pred", choices=("pred", "true"),
              help="Group calibration samples by predicted or true class."),
    )  # fmt: skip

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features:
        return {f"{d}-{i}": gram_stats(activations[(d, i)], self.max_gram_order,
                                       self.separate_diagonal) for d, i in self.layers}  # fmt: skip

    def _fit(self, features: Features, logits: Tensor, labels: Tensor) -> None:
        groups = logits.argmax(1) if self.calib_labels == "pred" else labels
        n_classes = logits.shape[1]
        self.bounds: dict[str, tuple[Tensor, Tensor]] = {}
        self.norms: dict[str, float] = {}
        for key, stats in features.items():
            flat = stats.flatten(1)  # (n, P*S)
            overall_low = flat.quantile(self.cut_off, dim=0)
            overall_high = flat.quantile(1 - self.cut_off, dim=0)
            low = overall_low.repeat(n_classes, 1)
            high = overall_high.repeat(n_classes, 1)
            for c in range(n_classes):
                sel = flat[groups == c]
                if len(sel) >= 2:  # classes never seen keep the pooled band
                    low[c] = sel.quantile(self.cut_off, dim=0)
                    high[c] = sel.quantile(1 - self.cut_off, dim=0)
            self.bounds[key] = (low, high)
            own = deviation(flat, low[groups], high[groups]).sum(1)
            mean = float(own.mean())
            self.norms[key] = mean if mean > 0 else 1.0

    def _conformity(self, features: Features, logits: Tensor) -> Tensor:
        total = torch.zeros(logits.shape[0], logits.shape[1], dtype=torch.float64, device=logits.device)
        for key, stats in features.items():
            low, high = self.bounds[key]
            flat = stats.flatten(1)
            for start in range(0, len(flat), 256):  # (chunk, C, F) at a time
                part = flat[start : start + 256, None, :]
                total[start : start + 256] += deviation(part, low[None], high[None]).sum(2) / self.norms[key]
        return -total


SCORES = (Gram,)
__all__ = ["Gram"]
