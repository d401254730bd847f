"""The base layer: types and small helpers shared by the recorder, the engine, the scores and the
evaluation (imports only :mod:`ood_core.layer_ids` from ``ood_core``).

Conventions: a batch is ``(n, ...)``; a conformity is ``(n, n_classes)``, higher = more
in-distribution; ``act_norm`` p-norms are taken per sample over all non-batch dims. A network
whose output is a tuple, list, mapping or object holding the logits is read through
:func:`select_output` (its layer ids are unchanged).
"""

from __future__ import annotations

import json
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ood_core.layer_ids import LayerId, layer_text, layers_text

__all__ = [
    "LayerId",
    "OutputError",
    "OutputKey",
    "SelectOutput",
    "base_net",
    "check_labels",
    "check_output_key",
    "describe_output",
    "exclusive_eval",
    "how_to_choose",
    "layer_text",
    "layers_text",
    "logits_problem",
    "net_lock",
    "output_key",
    "output_text",
    "parse_output",
    "select",
    "select_output",
    "viewed_net",
]

_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def net_lock(net: torch.nn.Module) -> threading.RLock:
    """The lock serialising every ood-lens pass over ``net`` (tracing, recording, gradient and
    prediction passes), so that sessions or threads sharing one model object never see each
    other's hooks or activations. Kept outside the model (a weak mapping); re-entrant. A
    :class:`SelectOutput` view shares the lock of the network it views."""
    net = base_net(net)
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


# ---------------------------------------------------------------------- selected outputs
OutputKey = int | str
"""Which element of a network's output holds the logits: an index into a tuple / list (or into
a mapping's values, as ``ModelOutput[0]``), or a mapping key (HF ``ModelOutput`` included) or
attribute name."""

MAX_LISTED = 8
"""Elements of an output listed in messages (the rest are counted)."""


class OutputError(ValueError):
    """The chosen output element does not exist, or the output is not logits (the message lists
    what the network returns and how to choose)."""


def check_output_key(output: Any) -> OutputKey | None:
    """``output`` if it is None, an ``int >= 0`` or a non-empty ``str``; ``ValueError`` else."""
    if output is None or (isinstance(output, str) and output.strip()):
        return output
    if isinstance(output, int) and not isinstance(output, bool) and output >= 0:
        return output
    raise ValueError(
        f"output must be an index >= 0 (a position in the tuple or list the network returns) or "
        f"a non-empty key (a dict key or attribute name, e.g. 'logits'); got {output!r}."
    )


def parse_output(text: str | None) -> OutputKey | None:
    """An output choice as typed (a dashboard field, a command-line flag): empty -> None,
    digits -> an index, ``'0'`` / ``"0"`` in quotes -> the key ``"0"``, other text -> a key.
    ``ValueError`` for a negative index or an empty quoted key."""
    text = (text or "").strip()
    if not text:
        return None
    if re.fullmatch(r"[+-]?\d+", text):
        return check_output_key(int(text))
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # noqa: PLR2004
        return check_output_key(text[1:-1])
    return check_output_key(text)


def output_text(output: OutputKey | None) -> str:
    """An output choice as :func:`parse_output` reads it back (``""`` for None; a key that
    reads as an index, or has surrounding spaces, in quotes)."""
    if output is None:
        return ""
    text = str(output)
    if isinstance(output, str) and (re.fullmatch(r"[+-]?\d+", text) or text != text.strip()):
        return repr(text)
    return text


def _shape_text(t: Tensor) -> str:
    dims = ["N", *map(str, t.shape[1:])] if t.ndim else []
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _value_text(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor {_shape_text(value)}"
    if isinstance(value, Mapping | list | tuple):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _elements(out: Any) -> list[tuple[OutputKey, Any]] | None:
    """``[(key, value)]`` of an output that holds elements (None for a tensor or a plain value)."""
    if isinstance(out, Tensor):
        return None
    if isinstance(out, Mapping):
        return list(out.items())
    if isinstance(out, list | tuple):
        return list(enumerate(out))
    fields = getattr(out, "__dict__", None)
    if isinstance(fields, dict):
        return [(k, v) for k, v in fields.items() if isinstance(k, str) and not k.startswith("_")]
    return None


def describe_output(out: Any) -> str:
    """What a network returned, e.g. ``'a tuple of 2: [0] Tensor (N, 10), [1] Tensor (N, 512)'``
    (``N``: the batch dimension; mapping keys as ``['logits']``, attributes as ``.logits``)."""
    items = _elements(out)
    if items is None:
        text = _value_text(out)
        return f"{'an' if text[:1] in 'AEIOU' else 'a'} {text}"
    name = type(out).__name__
    attrs = not isinstance(out, Mapping | list | tuple)
    shown = [
        (f".{k}" if attrs else f"[{k!r}]") + " " + _value_text(v) for k, v in items[:MAX_LISTED]
    ]
    if len(items) > MAX_LISTED:
        shown.append(f"... ({len(items) - MAX_LISTED} more)")
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name} of {len(items)}" + (": " + ", ".join(shown) if shown else "")


def _suggested_key(out: Any) -> OutputKey:
    """The element most likely to hold the logits: a mapping's ``logits``, else the first 2-D
    floating tensor, else 0."""
    items = _elements(out) or []
    keys = [k for k, _ in items]
    if "logits" in keys:
        return "logits"
    for k, v in items:
        if isinstance(v, Tensor) and v.ndim == 2 and v.is_floating_point():  # noqa: PLR2004
            return k
    return keys[0] if keys else 0


def how_to_choose(key: OutputKey) -> str:
    """The ways to choose output element ``key`` (API, config, dashboard)."""
    toml = json.dumps(key)
    return (
        f"Choose the element holding the logits: output={key!r} in Python "
        f"(Recorder(net, ..., output={key!r}) or fit_scores(..., output={key!r})), "
        f"`output = {toml}` under [model] in a run config, or the Output field of the "
        "dashboard's model section"
    )


def select(out: Any, key: OutputKey) -> Any:
    """Element ``key`` of a network's output ``out`` (:data:`OutputKey`); :class:`OutputError`
    listing what ``out`` holds when there is no such element."""
    found, value = False, None
    if isinstance(key, int) and not isinstance(key, bool):
        if isinstance(out, list | tuple) and 0 <= key < len(out):
            found, value = True, out[key]
        elif isinstance(out, Mapping) and 0 <= key < len(out):
            found, value = True, list(out.values())[key]
    elif isinstance(key, str) and not isinstance(out, Tensor):
        if isinstance(out, Mapping):
            found = key in out
            value = out[key] if found else None
        elif not isinstance(out, list | tuple) or hasattr(type(out), "_fields"):  # namedtuple
            found = hasattr(out, key) and not key.startswith("_")
            value = getattr(out, key) if found else None
    if found:
        return value
    if isinstance(out, Tensor):
        raise OutputError(
            f"output={key!r} but the network returns {describe_output(out)} itself: leave "
            "output unset (None) to read it as the logits."
        )
    raise OutputError(
        f"output={key!r} but the network returns {describe_output(out)}. Choose one of these "
        f"(e.g. output={_suggested_key(out)!r})."
    )


def logits_problem(out: Any, key: OutputKey | None = None, raw: Any = None) -> str | None:
    """Why ``out`` (the network's output, or element ``key`` of its output ``raw``) is not
    logits ``(N, n_classes)``, with what the network returns and how to choose; None if it is."""
    if isinstance(out, Tensor) and out.ndim == 2:  # noqa: PLR2004
        return None
    if key is None and _elements(out) is not None:
        return (
            f"The network returns {describe_output(out)}, not logits (N, n_classes). "
            f"{how_to_choose(_suggested_key(out))}."
        )
    if key is None:
        return (
            f"The network must return logits of shape (N, n_classes); it returns "
            f"{describe_output(out)}."
        )
    whole = f" of {describe_output(raw)}" if raw is not None else ""
    better = _suggested_key(raw) if raw is not None else None
    hint = f" (e.g. output={better!r})" if better is not None and better != key else ""
    return (
        f"output={key!r} selects {describe_output(out).removeprefix('a ').removeprefix('an ')}"
        f"{whole}, not logits (N, n_classes): choose the element holding the logits{hint}."
    )


class SelectOutput(nn.Module):
    """A view of ``net`` whose output is element ``output`` of ``net``'s output (:func:`select`).

    It shares ``net``'s parameters, buffers and sub-modules (the same dicts: nothing is copied,
    registered or changed on ``net``), so its layer table, layer ids, parameter names and
    ``state_dict`` are ``net``'s; ``train`` / ``eval`` / ``.to`` act on ``net``; its training
    flag, :func:`net_lock` and unknown attributes (e.g. ``ood_lens``) are ``net``'s. Its class
    name is ``net``'s too (layer tables read the same). Build it with :func:`select_output`."""

    def __init__(self, net: nn.Module, output: OutputKey) -> None:
        super().__init__()
        for name in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            object.__setattr__(self, name, getattr(net, name))
        object.__setattr__(self, "_ood_lens_net", net)
        object.__setattr__(self, "_ood_lens_output", check_output_key(output))

    @property
    def training(self) -> bool:  # type: ignore[override]
        net = self.__dict__.get("_ood_lens_net")
        return True if net is None else net.training

    @training.setter
    def training(self, mode: bool) -> None:
        net = self.__dict__.get("_ood_lens_net")  # None while nn.Module.__init__ runs
        if net is not None:
            net.training = mode

    def train(self, mode: bool = True) -> SelectOutput:
        self._ood_lens_net.train(mode)
        return self

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> SelectOutput:
        self._ood_lens_net._apply(fn, recurse)
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            net = self.__dict__.get("_ood_lens_net")
            if net is None or name.startswith("__"):
                raise
            return getattr(net, name)

    def extra_repr(self) -> str:
        return f"output={self._ood_lens_output!r}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return select(self._ood_lens_net(*args, **kwargs), self._ood_lens_output)


_VIEW_CLASSES: dict[type, type[SelectOutput]] = {}
_VIEWS: weakref.WeakKeyDictionary[nn.Module, dict[OutputKey, weakref.ref[SelectOutput]]] = (
    weakref.WeakKeyDictionary()
)


def base_net(net: nn.Module) -> nn.Module:
    """The user's network under any :class:`SelectOutput` views (``net`` itself otherwise)."""
    while isinstance(net, SelectOutput):
        net = net._ood_lens_net
    return net


def viewed_net(net: nn.Module) -> nn.Module:
    """The network a :class:`SelectOutput` view calls (``net`` itself for a plain network)."""
    return net._ood_lens_net if isinstance(net, SelectOutput) else net


def output_key(net: nn.Module) -> OutputKey | None:
    """The element a :class:`SelectOutput` view selects (None for a plain network)."""
    return net._ood_lens_output if isinstance(net, SelectOutput) else None


def select_output(net: nn.Module, output: OutputKey | None) -> nn.Module:
    """``net`` read through output element ``output`` (:class:`SelectOutput`), or ``net`` itself
    when ``output`` is None. One view per (network, output) while it is alive, so that caches
    keyed by the network see one object. ``ValueError`` unless ``output`` is an index >= 0 or a
    non-empty key."""
    output = check_output_key(output)
    if output is None:
        return net
    with _LOCKS_GUARD:
        views = _VIEWS.setdefault(net, {})
        ref = views.get(output)
        view = ref() if ref is not None else None
        if view is None:
            cls = type(net)
            if cls not in _VIEW_CLASSES:  # named as the network: layer tables read the same
                _VIEW_CLASSES[cls] = type(
                    cls.__name__, (SelectOutput,), {"__module__": cls.__module__}
                )
            view = _VIEW_CLASSES[cls](net, output)
            views[output] = weakref.ref(view)
        return view


Features = dict[str, Tensor]
"""A score's per-sample features of a batch or a dataset: ``{name: tensor (n, ...)}``."""

Progress = Callable[[int, int], None]
"""``progress(done, total)``, counts in samples."""

StageProgress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: a stage label, then counts in samples."""

ScoreProgress = Callable[[Any, int, int], None]
"""``on_score(score, i, n)``: score ``i`` of ``n`` starts its own work (its fit, or its
confidences from the features) once the shared pass is over."""


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
