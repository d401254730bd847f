"""The base layer: types and small helpers shared by the recorder, the engine, the scores and the
evaluation (imports only :mod:`ood_core.layer_ids` from ``ood_core``).

Conventions: a batch is ``(n, ...)``; a conformity is ``(n, n_classes)``, higher = more
in-distribution; ``act_norm`` p-norms are taken per sample over all non-batch dims.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ood_core.layer_ids import LayerId, layer_text, layers_text

__all__ = ["LayerId", "check_labels", "exclusive_eval", "layer_text", "layers_text", "net_lock"]

_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def net_lock(net: torch.nn.Module) -> threading.RLock:
    """The lock serialising every ood-lens pass over ``net`` (tracing, recording, gradient and
    prediction passes), so that sessions or threads sharing one model object never see each
    other's hooks or activations. Kept outside the model (a weak mapping); re-entrant."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(net)
        if lock is None:
            lock = _LOCKS[net] = threading.RLock()
        return lock


@contextmanager
def exclusive_eval(net: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Hold :func:`net_lock` with ``net`` in eval mode; its training flag is restored after."""
    with net_lock(net):
        was_training = net.training
        net.eval()
        try:
            yield net
        finally:
            net.train(was_training)


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


def predicted_classes(net: torch.nn.Module, images: Tensor, batch_size: int = 256) -> np.ndarray:
    """The network's predicted class of each image ``(n,)`` int64: ``argmax`` of its logits,
    batched, without gradients, on the network's device and dtype."""
    if len(images) == 0:
        return np.zeros(0, dtype=np.int64)
    param = next(iter(net.parameters()), None)
    kw = {"device": param.device, "dtype": param.dtype} if param is not None else {}
    out = []
    with exclusive_eval(net), torch.no_grad():
        for k in range(0, len(images), batch_size):
            x = torch.as_tensor(images[k : k + batch_size]).to(**kw, copy=True)
            out.append(net(x).argmax(1).cpu().numpy())
    return np.concatenate(out).astype(np.int64)


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
