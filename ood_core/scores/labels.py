"""The one check of calibration labels shared by every score that reads them.

Labels are class indices: integers (an integer tensor, or floats holding whole numbers) in
``[0, C - 1]``. A NaN, infinite, fractional or negative label, or one beyond the network's
classes, is refused naming the score, the offending value and its position; otherwise
``labels.long()`` would silently turn ``1.5`` into ``1`` and NaN into ``-2**63``.

Scores that read labels inherit :class:`UsesLabels`: :func:`check_labels` runs in
``fit_features`` on the labels as given, before they are cast to int64, with the score's number
of classes (:meth:`UsesLabels.label_classes`: the network's outputs; JTLA: also its
``n_classes_hint``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ood_core.core import check_labels


class UsesLabels:
    """Mixin of the scores that read calibration labels: ``fit_features`` refuses, with
    :func:`check_labels`, labels that are not class indices of the network (NaN, infinite,
    fractional, negative or ``>= label_classes``) before they reach ``_fit``."""

    @property
    def uses_labels(self) -> bool:
        """Whether this instance reads its calibration labels (e.g. Gram only with
        ``calib_labels='true'``)."""
        return True

    def label_classes(self, logits: Tensor) -> int | None:
        """Number of classes the labels index (default: the network's outputs)."""
        return int(logits.shape[1])

    def fit_features(self, features: Any, logits: Tensor, labels: Tensor | None) -> None:
        if labels is not None and self.uses_labels:
            labels = check_labels(self, labels, self.label_classes(logits))
        return super().fit_features(features, logits, labels)  # type: ignore[misc]


__all__ = ["UsesLabels", "check_labels"]
