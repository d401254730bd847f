"""The Ray executor: the shared forward passes of :mod:`ood_core.engine` on Ray Data actors.

:class:`RayEngine` keeps :class:`~ood_core.engine.Engine`'s ``extract`` contract (same plan, same
cache, same sinks, same :class:`~ood_core.engine.Extraction`) and replaces only where the batches
run (:meth:`RayEngine._stream`): a Ray dataset of batch numbers is mapped by a pool of actors
(``map_batches`` with a callable class over ``ActorPoolStrategy(size=workers)``), each holding
one model copy built by ``factory()`` (from the hub spec, never the hooked module pickled) and
its own :class:`~ood_core.recorder.Recorder`. An actor reads its batch's rows from the source
(shipped once through the object store), runs :func:`~ood_core.engine.forward_part` (the one
forward-and-extract implementation) and returns per-sample logits and features. The driver puts
parts back in dataset order by row id and feeds them to the pass exactly as a local batch: kept
features, the scores' streaming fits (sinks, merged on the driver in order) and the cache are the
local executor's, so numbers equal the local run's (float32 batches of the same size run the same
kernels; the test and benchmark measure max |diff|).

Conventions: a source readable by row (tensors, stored datasets: :class:`~ood_core.batches.
TensorSource`, :class:`~ood_core.batches.RowSource`) is shipped once through the object store and
each actor reads its batch's rows by batch number; any other source (a streamed parquet folder or
HF split, ``streaming = true``; any re-iterable of batches) is read in order by one Ray Data read
task pinned to the driver's node (its files need only be visible there), one block per batch,
and its batches flow to the actors. Results travel as one row per batch (``row``, ``part``: see
:func:`_one_row`). Scores with their own passes (gradients, perturbed inputs)
run on the driver's local engine, after the shared pass (its logits come from the cache when one
is given). Each actor asks ``num_cpus`` CPUs (0.5 by default: two 1-CPU actors beside Ray Data's
own tasks deadlock a 2-CPU machine) and ``gpus_per_worker`` GPUs. ``address=""`` starts a local
Ray (stopped by :meth:`close`), else connects to that cluster (left running).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import cloudpickle
import numpy as np
import torch
from torch import Tensor, nn

from ood_core.batches import BatchSource, RowSource, TensorSource
from ood_core.core import Features, LayerId, OutputError, Progress
from ood_core.engine import Engine, Extraction, PassPart, ScoreLike, forward_part
from ood_core.inputs import check_inputs
from ood_core.recorder import Recorder
from ood_core.streams import StreamError

RAY_NUM_CPUS = 0.5
"""CPUs each actor asks Ray for (fractional: see the module docstring)."""
LOCAL_RAY_CPUS = None
"""CPUs of a Ray started here (None: Ray counts this machine's)."""


class RayExecutionError(RuntimeError):
    """Ray could not run the pass (start-up, a lost actor); the message says what to do."""


def _row_batch(source: BatchSource, start: int, stop: int) -> tuple[Tensor, Tensor | None]:
    """Rows ``start:stop`` of a source readable by row: ``(images, labels or None)``."""
    if isinstance(source, TensorSource):
        y = None if source.y is None else source.y[start:stop]
        return source.x[start:stop], y
    if isinstance(source, RowSource):
        x = source.rows(start, stop)
        if source.transform is not None:
            x = source.transform(x)
        return x, None if source.y is None else source.y[start:stop]
    raise TypeError(f"{type(source).__name__} cannot be read by row")


def readable_by_row(source: BatchSource) -> bool:
    """Whether the Ray executor can read ``source`` (rows by position, known size)."""
    return isinstance(source, TensorSource | RowSource) and source.n is not None


class _Worker:
    """One Ray actor: a model copy, its Recorder, the dataset's source; ``__call__`` maps a batch
    of batch numbers ``{"id": (1,)}`` to per-sample columns (see :func:`_columns`)."""

    def __init__(
        self,
        factory: Callable[[], nn.Module],
        source: Any,
        first: Any,
        scores: bytes,
        layers: tuple[LayerId, ...],
        batch_size: int,
        device: str,
        amp: torch.dtype | None,
        input_range: Any,
    ) -> None:
        import ray

        source, first = (ray.get(v) if isinstance(v, ray.ObjectRef) else v for v in (source, first))
        self.source, self.layers = source, layers
        self.batch_size, self.amp = batch_size, amp
        dev = torch.device("cuda" if device.startswith("cuda") else device)
        net = factory().to(dev).eval()
        self.rec = Recorder(net, input_data=first[:1].to(dev), input_range=input_range)
        self.rec.record(*layers)
        _WORKER_RECORDER.append(self.rec)  # the scores are bound to this copy of the network
        self.scores = pickle.loads(scores)
        self.device = dev
        self.first = first
        self.reference: dict[LayerId, Tensor] | None = None

    def _part(self, x: Tensor, start: int) -> PassPart:
        where = f"inputs (samples {start:,} to {start + len(x) - 1:,})"
        check_inputs(self.rec.net, x, self.rec.input_shape, where, self.rec.input_range)
        dtype = next(iter(self.rec.net.parameters()), x).dtype
        # a copy: a network editing its input in place never changes the source
        xb = x.to(device=self.device, dtype=dtype, copy=True)
        return forward_part(self.rec, self.scores, self.layers, xb, self.amp)

    def _batch(self, batch: dict[str, np.ndarray]) -> tuple[int, Tensor, Tensor | None]:
        """``(start, images, labels or None)`` of a batch number (``id``) or a streamed batch
        (``item``: see :func:`_batch_items`)."""
        if "id" in batch:
            start = int(batch["id"][0]) * self.batch_size
            stop = min(int(self.source.n), start + self.batch_size)
            return start, *_row_batch(self.source, start, stop)
        start, x, y = batch["item"][0]
        if x is None:  # reading the stream failed there: ``y`` is the error
            raise y
        return int(start), torch.from_numpy(x), None if y is None else torch.from_numpy(y)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = int(batch["id"][0]) * self.batch_size if "id" in batch else batch["item"][0][0]
        try:
            if self.reference is None:  # the dataset's first sample, as computed in batch 0
                self.reference = self._part(self.first, 0).first
            start, x, y = self._batch(batch)
            part = self._part(x, start)
        except tuple(_RAISED.values()) as exc:  # a check: raised on the driver as it is
            return _one_row(start, _error_columns(exc, start))
        return _one_row(start, _columns(part, y, start, self.layers, self.reference))


def _one_row(start: int, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch's result as one Ray Data row: ``row`` (its first position) and ``part`` (its
    columns, an object). One schema for every result, errors included, so that Ray may join
    results of successive calls into one block."""
    part = np.empty(1, dtype=object)
    part[0] = cols
    return {"row": np.array([start], dtype=np.int64), "part": part}


def _batch_items(source: BatchSource, batch_size: int) -> Iterator[tuple[Any, ...]]:
    """A source's batches as ``(start, images, labels or None)`` (numpy), in order; a failing
    read ends them with ``(start, None, error)``, raised on the driver as the local pass would."""
    start = 0
    try:
        for x, y in source.batches(batch_size):
            yield start, x.numpy(), None if y is None else y.numpy()
            start += len(x)
    except tuple(_RAISED.values()) as exc:
        yield start, None, exc


def _streamed(ray: Any, source: BatchSource, batch_size: int) -> Any:
    """A Ray dataset of ``source``'s batches, one block per batch (column ``item``), read in
    order by one read task pinned to this (the driver's) node: its files need only be here."""
    from ray.data.block import BlockAccessor, BlockMetadata
    from ray.data.datasource import Datasource, ReadTask
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def read() -> Iterator[Any]:
        for item in _batch_items(source, batch_size):
            column = np.empty(1, dtype=object)
            column[0] = item
            yield BlockAccessor.batch_to_block({"item": column})

    class Batches(Datasource):
        def get_read_tasks(self, parallelism: int, **_: Any) -> list[Any]:
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(read, meta)]

        def estimate_inmemory_data_size(self) -> None:
            return None

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.data.read_datasource(
        Batches(), override_num_blocks=1, num_cpus=0, scheduling_strategy=here
    )


_WORKER_RECORDER: list[Recorder] = []
"""The Recorder of this worker process's network (set by :class:`_Worker` before it reads its
scores)."""


def _worker_recorder() -> Recorder:
    return _WORKER_RECORDER[-1]


class _WithoutNetwork(cloudpickle.Pickler):
    """Pickles scores without the network they are bound to: every :class:`Recorder` (which
    holds the hooked model) becomes the worker's own on loading (``extract`` reads only the
    score's parameters and fitted state)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Recorder):
            return _worker_recorder, ()
        return super().reducer_override(obj)


def _portable(scores: Sequence[ScoreLike]) -> bytes:
    """``scores`` pickled for a worker (:class:`_WithoutNetwork`)."""
    buf = io.BytesIO()
    _WithoutNetwork(buf).dump(list(scores))
    return buf.getvalue()


def _columns(
    part: PassPart,
    y: Tensor | None,
    start: int,
    layers: Sequence[LayerId],
    reference: dict[LayerId, Tensor],
) -> dict[str, np.ndarray]:
    """One part as Ray Data columns, all of ``b`` rows: ``row`` (positions), ``logits``, ``y``
    (when labelled), ``f{j}|{name}`` per score ``j`` and feature, ``varies`` ``(b, L)`` int8 per
    recorded layer (1: its value differs somewhere from the dataset's first sample, 0: not, 2:
    not a tensor) and ``t`` ``(b, 1 + S)``
    (forward and per-score seconds, divided by ``b``, so that a sum over rows gives them)."""
    b = len(part.logits)
    cols: dict[str, np.ndarray] = {
        "row": np.arange(start, start + b, dtype=np.int64),
        "logits": part.logits.cpu().numpy(),
    }
    if y is not None:
        cols["y"] = y.cpu().numpy()
    for j, feats in enumerate(part.features):
        for name, v in feats.items():
            cols[f"f{j}|{name}"] = v.cpu().numpy()
    varies = [
        2
        if layer not in part.first
        else int(part.varies[layer] or bool((part.first[layer] != reference[layer]).any()))
        for layer in layers
    ]
    cols["varies"] = np.tile(np.array(varies, dtype=np.int8), (b, 1))
    t = np.array([part.seconds_forward, *part.seconds]) / b
    cols["t"] = np.tile(t, (b, 1))
    return cols


def _from_columns(
    cols: dict[str, np.ndarray], n_scores: int, layers: Sequence[LayerId]
) -> tuple[PassPart, Tensor | None]:
    """The inverse of :func:`_columns` (rows of one or more parts, in order): ``first`` holds
    the recorded layers' flags only (the cross-batch comparison was made on the worker)."""
    logits = torch.from_numpy(np.array(cols["logits"]))  # a copy: Ray's arrays are read-only
    features: list[Features] = [{} for _ in range(n_scores)]
    for key, v in cols.items():
        if key.startswith("f") and "|" in key:
            j, name = key[1:].split("|", 1)
            features[int(j)][name] = torch.from_numpy(np.array(v))
    t = cols["t"].sum(axis=0)
    flags = cols["varies"]
    tensors = [j for j in range(len(layers)) if (flags[:, j] != 2).all()]  # noqa: PLR2004
    varies = {layers[j]: bool((flags[:, j] == 1).any()) for j in tensors}
    first = {layers[j]: torch.zeros(1) for j in tensors}  # varies already says it all
    y = torch.from_numpy(np.array(cols["y"])) if "y" in cols else None
    part = PassPart(logits, features, [float(s) for s in t[1:]], float(t[0]), first, varies)
    return part, y


class RayEngine(Engine):
    """An :class:`~ood_core.engine.Engine` whose shared forward passes run on Ray actors.

    Args:
        recorder: the driver's Recorder (layer table, checks, own passes).
        factory: builds the network on an actor (picklable; e.g. :func:`ood_core.runner.
            model_factory`).
        address: ``""`` starts a local Ray (``ray.init`` here, stopped by :meth:`close`), else a
            running cluster's address (``"auto"``, ``"ray://host:10001"``).
        workers: actors (model copies) in the pool.
        device: the device each actor runs on (``"cpu"`` or ``"cuda"``; with ``"cuda"`` each
            actor asks ``gpus_per_worker`` GPUs).
        amp: as :class:`~ood_core.engine.Engine`.
        num_cpus: CPUs each actor asks (:data:`RAY_NUM_CPUS`).
    """

    def __init__(
        self,
        recorder: Recorder,
        factory: Callable[[], nn.Module],
        *,
        address: str = "",
        workers: int = 2,
        device: str = "cpu",
        amp: str | None = None,
        gpus_per_worker: float = 0.0,
        num_cpus: float = RAY_NUM_CPUS,
    ) -> None:
        super().__init__(recorder, amp=amp)
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.factory, self.address, self.workers = factory, address, int(workers)
        self.device, self.gpus_per_worker, self.num_cpus = device, gpus_per_worker, num_cpus
        self.started_here = False
        self.seconds_startup = 0.0
        """Seconds ``ray.init`` took (0 until the first pass, or when Ray was already up)."""
        self._local = Engine(recorder, amp=amp)

    # ------------------------------------------------------------------ Ray's life
    def _ray(self) -> Any:
        import ray

        if not ray.is_initialized():
            t0 = time.perf_counter()
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address:
                kwargs["address"] = self.address
            else:
                kwargs["num_cpus"] = LOCAL_RAY_CPUS or os.cpu_count()
                # Ray writes a session folder and a token file: keep them out of $HOME
                kwargs["_temp_dir"] = os.environ.get("RAY_TMPDIR") or tempfile.mkdtemp(
                    prefix="ood-lens-ray-"
                )
            try:
                ray.init(**kwargs)
            except Exception as exc:  # noqa: BLE001  (any start-up failure: one clear message)
                if self.address:
                    fix = f'Check the address {self.address!r} (e.g. "ray://head:10001")'
                    where = f"the Ray cluster at {self.address!r}"
                else:
                    fix = "Set RAY_TMPDIR to a short writable folder (Ray's sockets live there)"
                    where = "a local Ray"
                raise RayExecutionError(
                    f'Could not start or reach {where}: {exc}. {fix}, or use executor = "local".'
                ) from exc
            self.started_here = True
            self.seconds_startup = time.perf_counter() - t0
        return ray

    def close(self) -> None:
        """Stop the Ray started here (a cluster given by address is left running)."""
        if self.started_here:
            import ray

            ray.shutdown()
            self.started_here = False

    # ------------------------------------------------------------------ the pass
    def extract(
        self,
        scores: Sequence[ScoreLike],
        data: Tensor | BatchSource,
        *,
        batch_size: int | None = None,
        progress: Progress | None = None,
        cache: Any | None = None,
        model_key: Hashable | None = None,
        data_key: Hashable | None = None,
        sinks: dict[int, Any] | None = None,
    ) -> Extraction:
        """:meth:`Engine.extract`, the shared pass on Ray; own-pass scores then run locally."""
        sinks = sinks or {}
        own = [i for i, s in enumerate(scores) if s.needs_own_pass]
        plain = [i for i in range(len(scores)) if i not in own]
        kw = {
            "batch_size": batch_size,
            "cache": cache,
            "model_key": model_key,
            "data_key": data_key,
        }
        parts: list[tuple[list[int], Extraction]] = []
        if plain or not own:
            sub = {plain.index(i): f for i, f in sinks.items() if i in plain}
            ex = super().extract(
                [scores[i] for i in plain], data, progress=progress, sinks=sub, **kw
            )
            parts.append((plain, ex))
        if own:
            sub = {own.index(i): f for i, f in sinks.items() if i in own}
            ex = self._local.extract(
                [scores[i] for i in own], data, progress=progress, sinks=sub, **kw
            )
            parts.append((own, ex))
        return _merge(parts, len(scores))

    def _stream(
        self,
        run: Any,
        source: BatchSource,
        batch_size: int,
        checked: bool,
        progress: Progress | None,
    ) -> None:
        if not run.plan.forward:  # logits cached, nothing to record: nothing to run remotely
            return super()._stream(run, source, batch_size, checked, progress)
        ray = self._ray()
        n = source.n
        first = next(iter(source.batches(batch_size)), None)
        if first is None:  # an empty stream: the pass says so as the local one does
            return
        todo = [run.scores[i] for i in run.plan.todo]
        ctx = ray.data.DataContext.get_current()
        previous = ctx.execution_options.preserve_order
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False  # the caller's progress callback says how far it is
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        by_row = readable_by_row(source)
        try:
            if by_row:
                n_batches = -(-int(n) // batch_size)  # type: ignore[arg-type]
                blocks = min(n_batches, 4 * self.workers)
                ds = ray.data.range(n_batches, override_num_blocks=blocks)
                pool = min(self.workers, n_batches)
            else:
                ds = _streamed(ray, source, batch_size)
                pool = self.workers
            ds = ds.map_batches(
                _Worker,
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=pool),
                num_cpus=self.num_cpus,
                num_gpus=self.gpus_per_worker if self.device.startswith("cuda") else 0,
                fn_constructor_kwargs={
                    "factory": self.factory,
                    "source": ray.put(source) if by_row else None,
                    "first": ray.put(first[0]),
                    "scores": _portable(todo),
                    "layers": run.plan.union,
                    "batch_size": batch_size,
                    "device": self.device,
                    "amp": self._amp_dtype,
                    "input_range": self.recorder.input_range,
                },
            )
            pending: dict[int, dict[str, np.ndarray]] = {}
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                pending.update(zip(out["row"].tolist(), out["part"], strict=True))
                while run.done in pending:  # in dataset order, whatever order parts came in
                    cols = pending.pop(run.done)
                    if "error" in cols:
                        _raise_worker_error(cols)
                    part, y = _from_columns(cols, len(todo), run.plan.union)
                    run.add(part, y)
                    if progress is not None:
                        progress(run.done, n if n is not None else run.done)
        except tuple(_RAISED.values()):
            raise
        except Exception as exc:
            raise _user_error(exc) from exc
        finally:
            ctx.execution_options.preserve_order = previous
        if pending or (n is not None and run.done != n):
            raise RayExecutionError(
                f"The Ray pass returned {run.done:,} of {n:,} samples in order; rerun, or use "
                'executor = "local".'
            )


def _user_error(exc: BaseException) -> BaseException:
    """A :class:`RayExecutionError` saying what failed on Ray (start-up, a lost actor); the
    workers' own input and output errors come back as columns (:func:`_error_columns`)."""
    return RayExecutionError(f"The Ray pass failed: {exc}")


_RAISED: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "TypeError": TypeError,
    "OutputError": OutputError,
    "StreamError": StreamError,
}
"""The errors a worker returns to the driver to raise as they are (Ray keeps only their text)."""


def _error_columns(exc: Exception, start: int) -> dict[str, np.ndarray]:
    """A worker's check failing on its batch, as one row: its class and message."""
    name = type(exc).__name__ if type(exc).__name__ in _RAISED else "ValueError"
    return {"row": np.array([start]), "error": np.array([f"{name}:{exc}"])}


def _raise_worker_error(cols: dict[str, np.ndarray]) -> None:
    name, message = str(cols["error"][0]).split(":", 1)
    raise _RAISED[name](message)


def _merge(parts: list[tuple[list[int], Extraction]], n_scores: int) -> Extraction:
    """One :class:`Extraction` of ``n_scores`` scores from sub-extractions of index subsets."""
    (first_idx, first), *rest = parts
    features: list[Features] = [{} for _ in range(n_scores)]
    seconds = [0.0] * n_scores
    for idx, ex in parts:
        for j, i in enumerate(idx):
            features[i] = ex.features[j]
            seconds[i] = ex.seconds_per_score[j]
    constant = tuple(dict.fromkeys(layer for _, ex in parts for layer in ex.constant_layers))
    labels = next((ex.labels for _, ex in parts if ex.labels is not None), None)
    return Extraction(
        first.logits,
        features,
        sum(ex.seconds_forward for _, ex in parts),
        seconds,
        sum(ex.n_forward_calls for _, ex in parts),
        constant,
        labels,
    )


__all__ = ["RayEngine", "RayExecutionError", "readable_by_row"]
