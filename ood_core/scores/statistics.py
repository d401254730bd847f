"""Streaming statistics: moments accumulated batch by batch, in float64, mergeable.

A score that fits from such statistics (``fit_kind = "streaming"``, see
:data:`ood_core.scores.base.FIT_KINDS`) never holds its calibration features: its memory is that
of the statistics (``C x D`` means and one ``D x D`` scatter matrix per layer), whatever the
number of calibration samples, and partial states computed on separate shards of the data merge
into the state of the whole (:meth:`ClassMoments.merge`), e.g. one per worker.

Updates and merges use the pairwise formulas of Chan, Golub & LeVeque (1979): for two groups
``a`` and ``b`` of one class with counts ``n_a, n_b``, means ``m_a, m_b`` and scatter matrices
``M_a, M_b`` (sums of outer products of deviations from the group's mean), the union has mean
``m_a + (m_b - m_a) n_b / n`` and scatter ``M_a + M_b + (m_b - m_a)(m_b - m_a)^T n_a n_b / n``
(``n = n_a + n_b``): no ``sum x x^T - n m m^T`` cancellation. The pooled within-class scatter
is the sum of the classes' scatters, so only it is kept (one ``D x D`` matrix, not ``C``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class ClassMoments:
    """Per-class counts ``(C,)``, means ``(C, D)`` and the pooled within-class scatter ``(D, D)``
    of rows ``h`` grouped by integer labels, float64, on ``device`` (created empty, sized by
    the first :meth:`update`)."""

    n_classes: int
    counts: Tensor | None = None
    means: Tensor | None = None
    scatter: Tensor | None = None
    device: torch.device | str = field(default="cpu")

    @property
    def n(self) -> int:
        return 0 if self.counts is None else int(self.counts.sum())

    def _empty(self, dims: int, device: torch.device) -> None:
        self.counts = torch.zeros(self.n_classes, dtype=torch.float64, device=device)
        self.means = torch.zeros(self.n_classes, dims, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(dims, dims, dtype=torch.float64, device=device)

    def update(self, h: Tensor, labels: Tensor) -> None:
        """Add rows ``h`` ``(b, D)`` with labels ``(b,)`` in ``[0, C)``."""
        h = h.detach().double()
        labels = labels.to(h.device).long()
        if self.counts is None:
            self._empty(h.shape[1], h.device)
        counts = torch.bincount(labels, minlength=self.n_classes).double()
        sums = h.new_zeros(self.n_classes, h.shape[1]).index_add_(0, labels, h)
        means = sums / counts.clamp_min(1)[:, None]
        residues = h - means[labels]
        self._merge(counts, means, residues.T @ residues)

    def merge(self, other: ClassMoments) -> None:
        """Add another state (e.g. of another shard of the data) into this one."""
        if other.counts is None:
            return
        if self.counts is None:
            self.counts, self.means, self.scatter = (
                other.counts.clone(),
                other.means.clone(),  # type: ignore[union-attr]
                other.scatter.clone(),  # type: ignore[union-attr]
            )
            return
        self._merge(other.counts, other.means, other.scatter)  # type: ignore[arg-type]

    def _merge(self, counts: Tensor, means: Tensor, scatter: Tensor) -> None:
        assert self.counts is not None and self.means is not None and self.scatter is not None
        total = self.counts + counts
        weight = torch.where(total > 0, counts / total.clamp_min(1), torch.zeros_like(total))
        delta = means - self.means
        cross = torch.where(total > 0, self.counts * counts / total.clamp_min(1), 0.0)
        self.scatter += scatter + (delta * cross[:, None]).T @ delta
        self.means += delta * weight[:, None]
        self.counts = total

    def covariance(self) -> Tensor:
        """The pooled within-class covariance ``scatter / (n - 1)`` ``(D, D)`` (as ``torch.cov``
        of the class-centred rows)."""
        assert self.scatter is not None
        return self.scatter / max(self.n - 1, 1)

    def present(self) -> Tensor:
        """``(C,)`` bool: the classes with at least one row."""
        assert self.counts is not None
        return self.counts > 0


@dataclass
class FeatureMeans:
    """Float64 sums and counts of each per-sample feature of a score (the streaming fit state of
    scores that need only the calibration mean, e.g. DICE and fDBD); mergeable."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    n: int = 0

    def update(self, features: dict[str, Tensor], logits: Tensor, labels: Tensor) -> None:
        for key, h in features.items():
            part = h.detach().double().sum(0)
            self.sums[key] = self.sums[key] + part if key in self.sums else part
        self.n += len(logits)

    def merge(self, other: FeatureMeans) -> None:
        for key, part in other.sums.items():
            self.sums[key] = self.sums[key] + part if key in self.sums else part.clone()
        self.n += other.n

    def mean(self, key: str) -> Tensor:
        """The mean ``(...)`` of feature ``key`` over every row seen."""
        return self.sums[key] / max(self.n, 1)


__all__ = ["ClassMoments", "FeatureMeans"]
