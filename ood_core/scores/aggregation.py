"""Aggregations of several values per sample (per-layer conformities, per-squeezer distances) into
one, as the reference library names them: ``fisher`` (sum of logs), ``geometric`` / ``harmonic``
(those means), ``max``, ``mean``, ``min``, ``prod``, ``sum``, or a float ``p`` (the p-norm)."""

from __future__ import annotations

import contextlib
import numbers
from typing import Any

import torch
from torch import Tensor

from ood_core.params import Param

AGGREGATIONS = ("fisher", "geometric", "harmonic", "max", "mean", "min", "prod", "sum")


def aggregate(values: Tensor, how: str | float, dim: int) -> Tensor:
    """Aggregate ``values`` along ``dim``: a name of :data:`AGGREGATIONS` or a float ``p``."""
    if not isinstance(how, str):
        return torch.linalg.vector_norm(values, ord=how, dim=dim)
    if how == "fisher":
        return values.log().sum(dim)
    if how == "geometric":
        return values.log().mean(dim).exp()
    if how == "harmonic":
        return 1 / (1 / values).mean(dim)
    return {
        "max": torch.amax,
        "min": torch.amin,
        "mean": torch.mean,
        "prod": torch.prod,
        "sum": torch.sum,
    }[how](values, dim)


class AggregationParam(Param):
    """A name of :data:`AGGREGATIONS` (case-insensitive) or a float ``p`` (the p-norm; numeric
    strings are read as floats)."""

    def range_text(self) -> str:
        return f"one of {AGGREGATIONS} or a float p (p-norm)"

    def validate(self, value: Any, owner: str) -> Any:
        if isinstance(value, str):
            name = value.strip().lower()
            if name in AGGREGATIONS:
                return name
            with contextlib.suppress(ValueError):
                value = float(name)
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value:
            return float(value)
        raise ValueError(
            f"{owner}: parameter {self.name!r} must be {self.range_text()}, got {value!r}"
        )
