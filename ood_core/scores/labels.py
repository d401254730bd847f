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

import torch
from torch import Tensor


def _owner_text(owner: Any) -> str:
    return owner if isinstance(owner, str) else repr(owner)


def check_labels(
    owner: Any, labels: Any, n_classes: int | None = None, what: str = "calibration labels"
) -> Tensor:
    """``labels`` as an int64 tensor, after checking that they are class indices: a 1-D integer
    tensor (or floats holding whole numbers), finite, ``>= 0`` and, with ``n_classes``,
    ``<= n_classes - 1``. ``ValueError`` naming ``owner`` (a score or a text), the first
    offending value and its index otherwise."""
    name = _owner_text(owner)
    t = torch.as_tensor(labels)
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(
            f"{name}: {what} must be integer class indices; got dtype {t.dtype}. Pass "
            "torch.as_tensor(labels, dtype=torch.long)."
        )
    if t.device.type == "meta":
        raise ValueError(f"{name}: {what} are on the 'meta' device (no values); pass real labels.")
    flat = t.reshape(-1)
    if t.is_floating_point():
        bad = ~torch.isfinite(flat)
        kind = "not finite"
        if not bool(bad.any()):
            bad = flat != flat.round()
            kind = "not a whole number"
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"{name}: {what} must be integer class indices; label {i} is "
                f"{float(flat[i])!r} ({kind}; {int(bad.sum())} such label(s)). Pass the true "
                "class of every calibration sample as an integer."
            )
    t = t.long()
    flat = t.reshape(-1)
    if not len(flat):
        return t
    bad = flat < 0 if n_classes is None else (flat < 0) | (flat >= n_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        rule = (
            "must be class indices >= 0"
            if n_classes is None
            else f"must lie in [0, {n_classes - 1}] ({n_classes} classes)"
        )
        raise ValueError(
            f"{name}: {what} {rule}; got [{int(flat.min())}, {int(flat.max())}], e.g. "
            f"{int(flat[i])} at index {i} ({int(bad.sum())} such label(s))."
        )
    return t


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
