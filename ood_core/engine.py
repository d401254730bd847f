"""The executor: batched passes over a dataset that turn it into every score's features.

The reference library runs a full forward pass per score per dataset. Here, for a list of scores
(each with its ``layers``), the engine records the union of the layers that all gradient-free
scores need and runs **one** batched ``torch.no_grad`` forward pass per dataset; in that pass each
score turns the batch's activations into small per-sample features (``score.extract``). Scores
that need gradients or modified inputs (``score.needs_own_pass``) run their own batched passes
(``extract_own``). The data arrive as a stream of batches (:mod:`ood_core.batches`: a tensor, rows
of a stored dataset, a DataLoader or a streamed Hugging Face split), so memory grows with batch x
layer size plus the per-sample features, never with dataset x image or raw activation size. A
:class:`FeatureCache` keeps each score's extracted features (and the logits) of a dataset within
a byte budget, spilling to an on-disk store past it, so that a refit after a parameter change
that does not alter the features (KNN's ``k``) runs no forward pass at all.

Orchestration (binding, fitting, confidences, warnings, timings) lives in
:mod:`ood_core.evaluation`; this module only runs passes, so another executor (e.g. a distributed
batch engine) could replace it behind the same ``extract`` contract. Scores are typed by the
:class:`ScoreLike` protocol: the engine imports no score.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from math import prod
from typing import Protocol

import torch
from torch import Tensor, nn

from ood_core.batches import BatchSource, as_source
from ood_core.core import (
    Features,
    LayerId,
    OutputError,
    OutputKey,
    Progress,
    Timed,
    exclusive_eval,
    logits_problem,
    normalise_activation,
    predicted_confidence,
)
from ood_core.devices import AMP_DTYPES
from ood_core.inputs import InputRange, check_inputs
from ood_core.recorder import Recorder
from ood_core.store import FeatureStore

CPU_BATCH_BYTES = 256 * 2**20
"""Memory budget of one batch's recorded activations on CPU (see :meth:`Engine.auto_batch_size`)."""
CPU_MAX_BATCH = 256
"""Largest automatic batch on CPU."""


def _net_device_dtype(net: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(net.parameters(), None)
    if p is None:
        b = next(net.buffers(), None)
        return (b.device, b.dtype) if b is not None else (torch.device("cpu"), torch.float32)
    return p.device, p.dtype


class LayerActivations(dict):
    """``{layer_id: output}`` of one batch, with ``.inputs``: ``{layer_id: input}``."""

    inputs: dict[LayerId, Tensor]


class ScoreLike(Protocol):
    """What the engine needs of a score (see :class:`ood_core.scores.base.BaseScore`)."""

    layers: tuple[LayerId, ...]
    act_norm: float | None
    normalises_concatenation: bool

    @property
    def needs_own_pass(self) -> bool: ...

    def feature_key(self) -> str | None: ...

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features: ...

    def extract_own(self, recorder: Recorder, x: Tensor) -> Features: ...


@dataclass(frozen=True)
class FeatureKey:
    """Identity of cached per-sample features: the model, the dataset (any hashable the caller
    chooses, e.g. a bundled set's name, split, size and seed, plus a perturbation), the layers
    (a score's layer tuple; None for the logits) and the extraction (a score's
    :meth:`~ood_core.scores.base.BaseScore.feature_key`; ``"logits"`` for the logits)."""

    model: Hashable
    dataset: Hashable
    layer: Hashable
    transform: str = "logits"


class FeatureCache:
    """Extracted per-sample features (each score's, and the logits) per :class:`FeatureKey`, on
    the CPU, within ``max_bytes`` (default 1 GiB). Raw activations are never kept: memory grows
    with the features the scores read (e.g. ``n x 80`` floats for a pooled layer), not with the
    network's maps. An entry too large for what is left is not kept (it is recomputed, never
    dropped silently from results); with a ``store`` (:class:`ood_core.store.FeatureStore`) it
    is written there instead and read back memory-mapped.

    ``constant``: per ``(model, dataset)``, the recorded layers seen constant over the dataset
    (so that a fit from cached features still warns about them).

    Safe to share between threads (the dashboard keeps one per process for all its sessions):
    reads, writes and clearing hold one lock. Keys must then name content, not just names (the
    runner puts the datasets' fingerprints into its data keys)."""

    def __init__(self, max_bytes: int = 2**30, store: FeatureStore | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self.store = store
        self.entries: dict[FeatureKey, Features] = {}
        self.constant: dict[tuple[Hashable, Hashable], dict[LayerId, bool]] = {}
        self.hits = 0
        self.misses = 0
        self._lock = threading.RLock()

    @property
    def keeps(self) -> bool:
        """Whether entries can be kept at all (a budget or a store): a cache that keeps nothing
        (a one-off CLI run's) makes no pass hold features only to cache them."""
        return self.max_bytes > 0 or self.store is not None

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (entries written to the store are not counted)."""
        with self._lock:
            return sum(_nbytes(f) for f in self.entries.values())

    def get(self, key: FeatureKey) -> Features | None:
        with self._lock:
            found = self.entries.get(key)
            if found is None and self.store is not None:
                found = self.store.get(key)
            return found

    def put(self, key: FeatureKey, features: Features) -> bool:
        """Keep ``features`` under ``key`` (in memory within the budget, else in the store);
        False when neither could take it."""
        size = _nbytes(features)
        with self._lock:
            if self.nbytes + size <= self.max_bytes:
                self.entries[key] = features
                return True
            if self.store is None:
                return False
            return bool(self.store.put(key, features))

    def clear(self) -> None:
        """Forget every entry, in memory and in the store (e.g. when the data changed)."""
        with self._lock:
            self.entries.clear()
            self.constant.clear()
            if self.store is not None:
                self.store.clear()


def _nbytes(features: Features) -> int:
    return sum(v.nbytes for v in features.values())


class _Collector:
    """Per-sample feature chunks of one score, gathered into whole tensors: written in place
    into tensors of ``n`` rows when ``n`` is known (no second copy), else concatenated."""

    def __init__(self, n: int | None) -> None:
        self.n = n
        self.filled = 0
        self.out: Features | None = None
        self.chunks: list[Features] = []

    def add(self, chunk: Features) -> None:
        chunk = {k: v.detach() for k, v in chunk.items()}
        if self.n is None:
            self.chunks.append(chunk)
            return
        if self.out is None:
            self.out = {k: v.new_empty((self.n, *v.shape[1:])) for k, v in chunk.items()}
        b = len(next(iter(chunk.values()))) if chunk else 0
        if self.filled + b > self.n:
            raise ValueError(
                f"The inputs yielded more samples than the {self.n:,} they declare; give the "
                "right n (or None) to the batch source."
            )
        for k, v in chunk.items():
            self.out[k][self.filled : self.filled + b] = v
        self.filled += b

    def result(self) -> Features:
        if self.n is None:
            if not self.chunks:
                return {}
            return {k: torch.cat([c[k] for c in self.chunks]) for k in self.chunks[0]}
        if self.out is None:
            return {}
        return {k: v[: self.filled] for k, v in self.out.items()}


@dataclass
class Extraction:
    """What one pass over a dataset produced: logits ``(n, C)`` and one feature dict per score."""

    logits: Tensor
    features: list[Features]
    seconds_forward: float = 0.0
    seconds_per_score: list[float] = field(default_factory=list)
    n_forward_calls: int = 0
    constant_layers: tuple[LayerId, ...] = ()
    """Recorded layers whose activation was the same for every sample of the dataset."""
    labels: Tensor | None = None
    """The labels the source yielded with its batches (None when it yields none, or when no
    pass over the data was needed)."""


@dataclass
class _Plan:
    """What a pass must compute: the scores whose features are not cached (``todo``), the layers
    to record for them, whether the data must be read at all, and the cache keys."""

    todo: list[int]
    cached: dict[int, Features]
    logits: Tensor | None
    union: tuple[LayerId, ...]
    keys: dict[int | None, FeatureKey]

    @property
    def forward(self) -> bool:
        return bool(self.union) or self.logits is None or bool(self.todo)


Sink = Callable[[Features, Tensor, "Tensor | None", int], None]
"""``sink(features of one batch, its logits, its labels (None when the source has none), index of
its first sample)``: a streaming fit."""


class _Pass:
    """The state of one pass over a dataset: collected features and logits, timings, the
    layers seen varying; :meth:`batch` runs one batch (forward, extraction, own passes)."""

    def __init__(
        self,
        scores: Sequence[ScoreLike],
        plan: _Plan,
        own: list[int],
        sinks: dict[int, Sink],
        n: int | None,
        amp: torch.dtype | None = None,
    ) -> None:
        self.scores, self.plan, self.own, self.sinks = scores, plan, own, sinks
        self.amp = amp
        # a streamed score's features are kept too when the cache will keep them (plan.keys)
        self.collect = {
            i: _Collector(n) for i in (*plan.todo, *own) if i not in sinks or i in plan.keys
        }
        self.logits = _Collector(n)
        self.labels = _Collector(n)
        self.labelled = True
        self.y: Tensor | None = None
        self.seconds = [0.0 for _ in scores]
        self.t_forward, self.n_calls, self.done = 0.0, 0, 0
        self.first: dict[LayerId, Tensor] = {}
        self.varies = dict.fromkeys(plan.union, False)

    def _keep(self, i: int, features: Features, logits: Tensor) -> None:
        if i in self.sinks:
            feats = {k: v.detach() for k, v in features.items()}
            self.sinks[i](feats, logits, self.y, self.done)
        if i in self.collect:
            self.collect[i].add(features)

    def batch(self, rec: Recorder, batch: Tensor, labels: Tensor | None) -> None:
        """One batch on this process: the shared forward pass (:func:`forward_part`) when the
        plan needs one, then the own passes."""
        device, dtype = _net_device_dtype(rec.net)
        # a copy: a network editing its input in place never changes the caller's data
        xb = batch.to(device=device, dtype=dtype, copy=True)
        logits = None
        if self.plan.forward:
            part = forward_part(
                rec, [self.scores[i] for i in self.plan.todo], self.plan.union, xb, self.amp
            )
            logits = part.logits
            self.add(part, labels, count=not self.own)
        else:
            self._labels(labels)
            if self.plan.logits is not None:
                logits = self.plan.logits[self.done : self.done + len(batch)].to(device)
        for i in self.own:
            with Timed() as t:
                feats = self.scores[i].extract_own(rec, xb)
                self._keep(i, feats, logits if logits is not None else torch.empty(0))
            self.seconds[i] += t.seconds
        if self.own or not self.plan.forward:
            self.done += len(batch)

    def _labels(self, labels: Tensor | None) -> None:
        self.y = labels
        if labels is None:
            self.labelled = False
        elif self.labelled:
            self.labels.add({"y": labels})

    def add(self, part: PassPart, labels: Tensor | None, count: bool = True) -> None:
        """Take one batch's shared-pass results (computed here or by a remote worker, in
        dataset order): its logits, the planned scores' features (kept, or fed to their sinks),
        timings and which layers vary; ``count``: advance the position past the batch."""
        self._labels(labels)
        self.t_forward += part.seconds_forward
        self.n_calls += 1
        for layer in self.plan.union:
            if self.varies[layer] or layer not in part.first:
                continue
            ref = self.first.setdefault(layer, part.first[layer])
            self.varies[layer] = part.varies[layer] or bool((part.first[layer] != ref).any())
        self.logits.add({"logits": part.logits})
        for i, feats, sec in zip(self.plan.todo, part.features, part.seconds, strict=True):
            self._keep(i, feats, part.logits)
            self.seconds[i] += sec
        if count:
            self.done += len(part.logits)


@dataclass
class PassPart:
    """One batch's shared forward pass: its logits ``(b, C)``, each planned score's features
    (in plan order), each score's extraction seconds, the forward seconds, and per recorded
    layer its first sample's activation ``(1, ...)`` and whether the batch's samples differ
    (the engine's constant-layer check, merged across batches by :meth:`_Pass.add`)."""

    logits: Tensor
    features: list[Features]
    seconds: list[float]
    seconds_forward: float
    first: dict[LayerId, Tensor]
    varies: dict[LayerId, bool]


def forward_part(
    rec: Recorder,
    scores: Sequence[ScoreLike],
    layers: Sequence[LayerId],
    xb: Tensor,
    amp: torch.dtype | None = None,
) -> PassPart:
    """The shared forward pass of one batch ``xb`` (already on the network's device and dtype)
    with ``layers`` recorded: the logits and each score's ``extract`` of its layers, under
    autocast with ``amp`` (logits and activations cast back to the network's dtype before any
    score reads them). The one implementation, on this process or on a worker."""
    device, dtype = _net_device_dtype(rec.net)
    with Timed() as t, torch.no_grad(), _autocast(device, amp):
        logits = rec(xb)
    problem = logits_problem(logits, rec.output)
    if problem:
        raise OutputError(problem)
    # under autocast the network computes in low precision; the scores, in float32
    logits = _full(logits.detach(), dtype)
    acts = {k: _full(v, dtype) for k, v in rec.activations.items()}
    inputs = {k: _full(v, dtype) for k, v in rec.inputs.items()}
    first: dict[LayerId, Tensor] = {}
    varies: dict[LayerId, bool] = {}
    for layer in layers:
        a = acts.get(layer)
        if isinstance(a, Tensor):
            first[layer] = a[:1].detach().clone()
            varies[layer] = bool((a != a[:1]).any())
    features, seconds = [], []
    for s in scores:
        with Timed() as ts, torch.no_grad():
            features.append(
                {k: v.detach() for k, v in s.extract(logits, _view(s, acts, inputs)).items()}
            )
        seconds.append(ts.seconds)
    return PassPart(logits, features, seconds, t.seconds, first, varies)


class Engine:
    """Runs the passes that turn datasets into several scores' features, sharing one forward pass.

    Args:
        recorder: a :class:`Recorder` on the network (one per network; see :meth:`for_net`).
        amp: ``None`` (full precision), ``"bf16"`` or ``"fp16"``: the shared forward passes run
            under :func:`torch.autocast` with that dtype on the network's device, and the
            logits and recorded activations are cast back to the network's dtype before any
            score reads them (own passes, e.g. gradients, stay in full precision). AMP changes
            the numbers (bf16: about 1e-2 on confidences), so callers key caches by it
            (:meth:`ood_core.config.RunConfig.model_key`).
    """

    def __init__(self, recorder: Recorder, amp: str | None = None) -> None:
        self.recorder = recorder
        self.net = recorder.net
        self.amp = amp
        self._amp_dtype = None if amp is None else AMP_DTYPES[amp]

    @classmethod
    def for_net(
        cls,
        net: Recorder | nn.Module,
        example: Tensor,
        *,
        output: OutputKey | None = None,
        input_range: InputRange = None,
    ) -> Engine:
        """An engine for ``net`` (a Recorder, or a network traced here with the example batch
        ``example``, reading output element ``output`` and checking inputs against
        ``input_range``, as :class:`Recorder` does; nothing is stored on the network: callers
        that run often keep the Recorder, as :class:`ood_core.runner.RunCache` does)."""
        if isinstance(net, Recorder):
            if output is not None or input_range is not None:
                raise ValueError(
                    "This Recorder is already traced: give output= and input_range= to "
                    "Recorder(net, ...) itself, or pass the network instead."
                )
            return cls(net)
        # declared shape / dtype / range, before tracing on it
        check_inputs(net, example, input_range=input_range)
        device, dtype = _net_device_dtype(net)
        example = example[:1].to(device=device, dtype=dtype)
        return cls(Recorder(net, input_data=example, output=output, input_range=input_range))

    # ------------------------------------------------------------------ batching
    def auto_batch_size(self, layers: Sequence[LayerId], sample_numel: int) -> int:
        """Batch size keeping one batch's recorded activations within a memory budget
        (:data:`CPU_BATCH_BYTES` on CPU, a quarter of the free memory on CUDA), in [16,
        :data:`CPU_MAX_BATCH`] on CPU (larger CPU batches fall out of the caches: 1,024 images
        run about 2x slower than 256 on the bundled models) and [16, 1024] on CUDA."""
        device, dtype = _net_device_dtype(self.net)
        sizes = [self.recorder.info(layer).output_size for layer in layers]
        numel = sample_numel + sum(prod(size[1:]) if size else 0 for size in sizes)
        per_sample = max(1, 4 * numel * dtype.itemsize)  # x4: activations, copies, autograd slack
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget, cap = free // 4, 1024
        else:
            budget, cap = CPU_BATCH_BYTES, CPU_MAX_BATCH
        return int(min(cap, max(16, budget // per_sample)))

    # ------------------------------------------------------------------ the pass
    def _plan(
        self,
        scores: Sequence[ScoreLike],
        cache: FeatureCache | None,
        model_key: Hashable | None,
        data_key: Hashable | None,
        streamed: set[int] = frozenset(),  # type: ignore[assignment]
    ) -> _Plan:
        """``streamed``: scores whose features go to a sink: read from the cache and kept in it
        only when the cache keeps entries (:attr:`FeatureCache.keeps`)."""
        plain = [i for i, s in enumerate(scores) if not s.needs_own_pass]
        keys: dict[int | None, FeatureKey] = {}
        cached: dict[int, Features] = {}
        logits = None
        if cache is not None and model_key is not None and data_key is not None:
            keys[None] = FeatureKey(model_key, data_key, None, "logits")
            for i in (i for i in plain if cache.keeps or i not in streamed):
                fkey = scores[i].feature_key()
                if fkey is not None:  # None: features that read fitted state, never cached
                    keys[i] = FeatureKey(model_key, data_key, scores[i].layers, fkey)
            stored = cache.get(keys[None])
            logits = None if stored is None else stored["logits"]
            for i in (i for i in plain if i in keys):
                found = cache.get(keys[i])
                if found is not None:
                    cached[i] = found
            complete = logits is not None and len(cached) == len(plain)
            cache.hits += complete
            cache.misses += not complete
        todo = [i for i in plain if i not in cached]
        rec = self.recorder
        wanted = {layer for i in todo for layer in scores[i].layers}
        union = tuple(layer for layer in rec.layer_ids if layer in wanted)
        return _Plan(todo, cached, logits, union, keys)

    def extract(
        self,
        scores: Sequence[ScoreLike],
        data: Tensor | BatchSource,
        *,
        batch_size: int | None = None,
        progress: Progress | None = None,
        cache: FeatureCache | None = None,
        model_key: Hashable | None = None,
        data_key: Hashable | None = None,
        sinks: dict[int, Sink] | None = None,
    ) -> Extraction:
        """One pass over ``data`` (a tensor ``(N, ...)`` or a :class:`~ood_core.batches.
        BatchSource` streamed batch by batch): logits and every score's per-sample features.

        With a ``cache`` and both keys, each score's features and the logits are read from the
        cache when it holds them (no forward pass when it holds all: ``n_forward_calls == 0``),
        and stored in it after a pass otherwise. Scores with their own passes always run them.
        ``sinks[i]``: score ``i``'s features go, batch by batch, to ``sinks[i](features, logits,
        start)`` (a streaming fit) instead of being kept (its ``Extraction.features`` is
        empty, unless the cache keeps entries: then they are cached too, and read back from it
        into the sink on a later pass). Only one batch of images and activations is held at a
        time.
        """
        rec = self.recorder
        if rec.output_problem:  # before any pass: the traced output is no logits
            raise OutputError(rec.output_problem)
        if isinstance(data, Tensor):  # the whole tensor at once: positions in messages are global
            check_inputs(self.net, data, rec.input_shape, input_range=rec.input_range)
        source = as_source(data)
        sinks = sinks or {}
        plan = self._plan(scores, cache, model_key, data_key, streamed=set(sinks))
        own = [i for i, s in enumerate(scores) if s.needs_own_pass]
        if not plan.forward and not own:
            return self._feed(
                sinks, plan, self._from_cache(scores, plan, cache, model_key, data_key)
            )
        shape = source.sample_shape or tuple(source.example().shape[1:])
        run = _Pass(scores, plan, own, sinks, source.n, self._amp_dtype)
        previous = rec.recording
        rec.record(*plan.union)
        # one pass at a time on a model shared by sessions or threads, in eval mode
        with exclusive_eval(self.net):
            try:
                bs = batch_size or self.auto_batch_size(plan.union, prod(shape))
                self._stream(run, source, bs, checked=isinstance(data, Tensor), progress=progress)
            finally:
                rec.record(*previous)
        return self._feed(sinks, plan, self._finish(scores, plan, run, cache, model_key, data_key))

    @staticmethod
    def _feed(sinks: dict[int, Sink], plan: _Plan, ex: Extraction) -> Extraction:
        """A streamed score whose features came from the cache gets them all at once: every
        sink sees every sample, from the pass or from the cache."""
        for i in (i for i in sinks if i in plan.cached):
            sinks[i](ex.features[i], ex.logits, ex.labels, 0)
        return ex

    def _stream(
        self,
        run: _Pass,
        source: BatchSource,
        batch_size: int,
        checked: bool,
        progress: Progress | None,
    ) -> None:
        """Feed ``source``'s batches through ``run`` in order, on this process (``checked``: the
        inputs were checked whole already). Another executor overrides this, and only this."""
        rec = self.recorder
        for batch, labels in source.batches(batch_size):
            if not checked:
                where = f"inputs (samples {run.done:,} to {run.done + len(batch) - 1:,})"
                check_inputs(self.net, batch, rec.input_shape, where, rec.input_range)
            run.batch(rec, batch, labels)
            if progress is not None:
                progress(run.done, source.n if source.n is not None else run.done)

    def _finish(
        self,
        scores: Sequence[ScoreLike],
        plan: _Plan,
        run: _Pass,
        cache: FeatureCache | None,
        model_key: Hashable,
        data_key: Hashable,
    ) -> Extraction:
        """The pass's :class:`Extraction`, its features and logits kept in the cache."""
        if not run.done:
            raise ValueError("Cannot compute scores on empty inputs (0 samples).")
        all_logits = run.logits.result()["logits"] if plan.forward else plan.logits
        assert all_logits is not None
        if torch.isnan(all_logits).any():
            raise ValueError(
                "The network produced NaN logits on this data; check the inputs' range "
                "and normalisation."
            )
        features = {i: c.result() for i, c in run.collect.items()}
        constant = tuple(layer for layer, v in run.varies.items() if not v and layer in run.first)
        if cache is not None and plan.keys:
            known = cache.constant.setdefault((model_key, data_key), {})
            known.update({layer: layer in constant for layer in plan.union})
            if plan.logits is None:
                cache.put(plan.keys[None], {"logits": all_logits.cpu()})
            for i in (i for i in plan.todo if i in plan.keys and i in features):
                cache.put(plan.keys[i], {k: v.cpu() for k, v in features[i].items()})
            constant = self._constant(scores, cache, model_key, data_key)
        if run.done < 2:  # noqa: PLR2004
            constant = ()
        labels = run.labels.result().get("y") if run.labelled else None
        return Extraction(
            all_logits,
            [features.get(i, plan.cached.get(i, {})) for i in range(len(scores))],
            run.t_forward,
            run.seconds,
            run.n_calls,
            constant,
            labels,
        )

    def _constant(
        self,
        scores: Sequence[ScoreLike],
        cache: FeatureCache,
        model_key: Hashable,
        data_key: Hashable,
    ) -> tuple[LayerId, ...]:
        """The scores' layers seen constant on this dataset (from the cache's record)."""
        known = cache.constant.get((model_key, data_key), {})
        layers = {layer for s in scores for layer in s.layers}
        return tuple(
            layer for layer in self.recorder.layer_ids if known.get(layer) and layer in layers
        )

    def _from_cache(
        self,
        scores: Sequence[ScoreLike],
        plan: _Plan,
        cache: FeatureCache | None,
        model_key: Hashable,
        data_key: Hashable,
    ) -> Extraction:
        """Everything was cached: no pass over the data at all."""
        assert plan.logits is not None and cache is not None
        device, _ = _net_device_dtype(self.net)
        logits = plan.logits.to(device)
        constant = self._constant(scores, cache, model_key, data_key) if len(logits) > 1 else ()
        feats = [
            {k: v.to(device) for k, v in plan.cached.get(i, {}).items()} for i in range(len(scores))
        ]
        return Extraction(logits, feats, 0.0, [0.0 for _ in scores], 0, constant)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device`` with ``dtype``, or no context for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _full(t: object, dtype: torch.dtype) -> object:
    """A floating tensor computed in lower precision, cast back to ``dtype``; else unchanged."""
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype:
        return t.to(dtype)
    return t


def _view(
    s: ScoreLike, acts: dict[LayerId, Tensor], inputs: dict[LayerId, Tensor]
) -> LayerActivations:
    """The score's layers of one batch, normalised per layer (or by the score after concat)."""
    a = LayerActivations(
        (
            layer,
            acts[layer]
            if s.normalises_concatenation
            else normalise_activation(acts[layer], s.act_norm),
        )
        for layer in s.layers
    )
    a.inputs = {layer: inputs[layer] for layer in s.layers if layer in inputs}
    return a


__all__ = [
    "Engine",
    "Extraction",
    "PassPart",
    "FeatureCache",
    "FeatureKey",
    "LayerActivations",
    "ScoreLike",
    "forward_part",
    "normalise_activation",
    "predicted_confidence",
]
