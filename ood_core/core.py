"""The base layer: types and small helpers shared by the recorder, the engine, the scores and the
evaluation (imports nothing from ``ood_core``).

Conventions: a batch is ``(n, ...)``; a conformity is ``(n, n_classes)``, higher = more
in-distribution; ``act_norm`` p-norms are taken per sample over all non-batch dims.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

LayerId = tuple[int, int]
"""torchinfo's ``(depth, depth_index)`` of a layer; ``(0, 1)`` is the whole network."""

Features = dict[str, Tensor]
"""A score's per-sample features of a batch or a dataset: ``{name: tensor (n, ...)}``."""

Progress = Callable[[int, int], None]
"""``progress(done, total)``, counts in samples."""

StageProgress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: a stage label, then counts in samples."""


class Timed:
    """Context manager measuring wall time in seconds (``.seconds``)."""

    seconds: float = 0.0

    def __enter__(self) -> Timed:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0


def normalise_activation(a: Tensor, p: float | None) -> Tensor:
    """Divide each sample's activation by its p-norm over all non-batch dims (None: unchanged;
    an all-zero sample stays zero)."""
    if p is None:
        return a
    norms = a.flatten(1).norm(p=p, dim=1).clamp_min(torch.finfo(a.dtype).tiny)
    return a / norms.view(-1, *([1] * (a.ndim - 1)))


def predicted_confidence(logits: Tensor, conformity: Tensor) -> Tensor:
    """The conformity at the predicted class: ``conformity[i, argmax(logits[i])]`` -> ``(n,)``."""
    return conformity.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)


class Registry(dict):
    """Name -> class, filled by the :meth:`register` class decorator: the one registry mechanism
    of scores, perturbations and metrics. A class registers under its ``key`` attribute when it
    has one, else its class name; :meth:`get_class` fails with a "did you mean" message."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, cls: type) -> type:
        """Class decorator: add ``cls`` (a name already taken by another class is an error)."""
        name = getattr(cls, "key", None) or cls.__name__
        if not isinstance(name, str) or not name:
            raise ValueError(f"cannot register {cls.__name__} as a {self.kind}: empty name")
        if self.get(name, cls) is not cls:
            raise ValueError(f"cannot register {cls.__name__}: the {self.kind} name {name!r} is "
                             f"taken by {self[name].__module__}.{self[name].__name__}")  # fmt: skip
        self[name] = cls
        return cls

    def get_class(self, name: str) -> type:
        if name in self:
            return self[name]
        import difflib

        close = difflib.get_close_matches(str(name), list(self), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(self)}.")
