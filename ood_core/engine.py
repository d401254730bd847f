"""The executor: batched passes over a dataset that turn it into every score's features.

The reference library runs a full forward pass per score per dataset. Here, for a list of scores
(each with its ``layers``), the engine records the union of the layers that all gradient-free
scores need and runs **one** batched ``torch.no_grad`` forward pass per dataset; in that pass each
score turns the batch's activations into small per-sample features (``score.extract``). Scores
that need gradients or modified inputs (``score.needs_own_pass``) run their own batched passes
(``extract_own``). Memory therefore grows with batch x layer size plus the per-sample features,
never with dataset x raw activation size -- unless an :class:`ActivationCache` is given, which
keeps the recorded activations of a dataset (within a byte budget) so that a later extraction on
the same (model, dataset, layers) runs no forward pass at all.

Orchestration (binding, fitting, confidences, warnings, timings) lives in
:mod:`ood_core.evaluation`; this module only runs passes, so another executor (e.g. a distributed
batch engine) could replace it behind the same ``extract`` contract. Scores are typed by the
:class:`ScoreLike` protocol: the engine imports no score.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from math import prod
from typing import Protocol

import torch
from torch import Tensor, nn

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
from ood_core.inputs import InputRange, check_inputs
from ood_core.recorder import Recorder

CPU_BATCH_BYTES = 256 * 2**20


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

    def extract(self, logits: Tensor, activations: dict[LayerId, Tensor]) -> Features: ...

    def extract_own(self, recorder: Recorder, x: Tensor) -> Features: ...


@dataclass(frozen=True)
class FeatureKey:
    """Identity of cached activations: the model, the dataset (any hashable the caller chooses,
    e.g. a bundled set's name, split, size and seed, plus a perturbation), the layer (``None``:
    the logits) and the activation transform (``"raw"``: as the network produced them; scores
    apply ``act_norm`` when they read them)."""

    model: Hashable
    dataset: Hashable
    layer: LayerId | None
    transform: str = "raw"


class ActivationCache:
    """Recorded activations (outputs, and inputs where the hook saw them) and logits per
    :class:`FeatureKey`, on the CPU, within ``max_bytes`` (default 2 GiB): a layer too large for
    what is left is simply not cached (it is recomputed, never dropped silently from results)."""

    def __init__(self, max_bytes: int = 2 * 2**30) -> None:
        self.max_bytes = int(max_bytes)
        self.entries: dict[FeatureKey, tuple[Tensor, Tensor | None]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + (i.nbytes if i is not None else 0) for a, i in self.entries.values())

    def get(self, key: FeatureKey) -> tuple[Tensor, Tensor | None] | None:
        return self.entries.get(key)

    def put(self, key: FeatureKey, output: Tensor, inputs: Tensor | None) -> bool:
        size = output.nbytes + (inputs.nbytes if inputs is not None else 0)
        if self.nbytes + size > self.max_bytes:
            return False
        self.entries[key] = (output, inputs)
        return True

    def clear(self) -> None:
        self.entries.clear()


def _cat(chunks: list[Features]) -> Features:
    if not chunks:
        return {}
    return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}


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


class Engine:
    """Runs the passes that turn datasets into several scores' features, sharing one forward pass.

    Args:
        recorder: a :class:`Recorder` on the network (one per network; see :meth:`for_net`).
    """

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.net = recorder.net

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
        that run often keep the Recorder, as :class:`ood_core.pipeline.RunCache` does)."""
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
        (256 MiB on CPU, a quarter of the free memory on CUDA), in [16, 1024]."""
        device, dtype = _net_device_dtype(self.net)
        sizes = [self.recorder.info(layer).output_size for layer in layers]
        numel = sample_numel + sum(prod(size[1:]) if size else 0 for size in sizes)
        per_sample = max(1, 4 * numel * dtype.itemsize)  # x4: activations, copies, autograd slack
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = free // 4
        else:
            budget = CPU_BATCH_BYTES
        return int(min(1024, max(16, budget // per_sample)))

    # ------------------------------------------------------------------ the pass
    def extract(
        self,
        scores: Sequence[ScoreLike],
        data: Tensor,
        *,
        batch_size: int | None = None,
        progress: Progress | None = None,
        cache: ActivationCache | None = None,
        model_key: Hashable | None = None,
        data_key: Hashable | None = None,
    ) -> Extraction:
        """One pass over ``data`` ``(N, ...)``: logits and every score's per-sample features.

        With a ``cache`` and both keys, the recorded activations and logits are read from the
        cache when it holds them all (no forward pass; ``n_forward_calls == 0``), and stored in it
        after a pass otherwise. Scores with their own passes always run them on ``data``.
        """
        rec = self.recorder
        if rec.output_problem:  # before any pass: the traced output is no logits
            raise OutputError(rec.output_problem)
        check_inputs(self.net, data, rec.input_shape, input_range=rec.input_range)
        plain = [s for s in scores if not s.needs_own_pass]
        union = tuple(l for l in rec.layer_ids if any(l in s.layers for s in plain))  # noqa: E741
        use_cache = cache is not None and model_key is not None and data_key is not None
        keys = {layer: FeatureKey(model_key, data_key, layer) for layer in (None, *union)}
        stored = {layer: cache.get(k) for layer, k in keys.items()} if use_cache else {}
        from_cache = use_cache and all(v is not None for v in stored.values())
        if use_cache:
            cache.hits += from_cache
            cache.misses += not from_cache
        previous = rec.recording
        if not from_cache:
            rec.record(*union)
        device, dtype = _net_device_dtype(self.net)
        bs = batch_size or self.auto_batch_size(union, prod(data.shape[1:]))
        chunks: list[list[Features]] = [[] for _ in scores]
        logits_chunks: list[Tensor] = []
        keep: dict[LayerId, tuple[list[Tensor], list[Tensor]]] = {}
        if use_cache and not from_cache:
            keep = {layer: ([], []) for layer in union}
        seconds = [0.0 for _ in scores]
        t_forward = 0.0
        n_calls = 0
        first: dict[LayerId, Tensor] = {}
        varies = dict.fromkeys(union, False)
        # one pass at a time on a model shared by sessions or threads, in eval mode
        with exclusive_eval(self.net):
            try:
                n = len(data)
                for start in range(0, n, bs):
                    stop = min(start + bs, n)
                    # a copy: a network editing its input in place never changes the caller's data
                    xb = data[start:stop].to(device=device, dtype=dtype, copy=True)
                    if from_cache:
                        logits = stored[None][0][start:stop].to(device)
                        acts = {layer: stored[layer][0][start:stop].to(device) for layer in union}
                        inputs = {
                            layer: stored[layer][1][start:stop].to(device)
                            for layer in union
                            if stored[layer][1] is not None
                        }
                    else:
                        with Timed() as t, torch.no_grad():
                            logits = rec(xb)
                        t_forward += t.seconds
                        n_calls += 1
                        problem = logits_problem(logits, rec.output)
                        if problem:
                            raise OutputError(problem)
                        acts, inputs = dict(rec.activations), dict(rec.inputs)
                        for layer, (outs, ins) in keep.items():
                            outs.append(acts[layer].detach().cpu())
                            if layer in inputs:
                                ins.append(inputs[layer].detach().cpu())
                    for layer in union:
                        if not varies[layer] and isinstance(acts.get(layer), Tensor):
                            ref = first.setdefault(layer, acts[layer][:1])
                            varies[layer] = bool((acts[layer] != ref).any())
                    logits = logits.detach()
                    logits_chunks.append(logits)
                    for i, s in enumerate(scores):
                        if s.needs_own_pass:
                            continue
                        with Timed() as t, torch.no_grad():
                            a = LayerActivations(  # normalised per layer, or by the score after concat
                                (
                                    layer,
                                    acts[layer]
                                    if s.normalises_concatenation
                                    else normalise_activation(acts[layer], s.act_norm),
                                )
                                for layer in s.layers
                            )
                            a.inputs = {
                                layer: inputs[layer] for layer in s.layers if layer in inputs
                            }
                            chunks[i].append(
                                {k: v.detach() for k, v in s.extract(logits, a).items()}
                            )
                        seconds[i] += t.seconds
                    for i, s in enumerate(scores):
                        if not s.needs_own_pass:
                            continue
                        with Timed() as t:
                            chunks[i].append(
                                {k: v.detach() for k, v in s.extract_own(rec, xb).items()}
                            )
                        seconds[i] += t.seconds
                    if progress is not None:
                        progress(stop, n)
            finally:
                if not from_cache:
                    rec.record(*previous)
        all_logits = torch.cat(logits_chunks)
        if torch.isnan(all_logits).any():
            raise ValueError(
                "The network produced NaN logits on this data; check the inputs' range "
                "and normalisation."
            )
        if keep:
            cache.put(keys[None], all_logits.cpu(), None)
            for layer, (outs, ins) in keep.items():
                cache.put(
                    keys[layer], torch.cat(outs), torch.cat(ins) if len(ins) == len(outs) else None
                )
        constant = tuple(layer for layer, v in varies.items() if not v and layer in first)
        if len(data) < 2:
            constant = ()
        return Extraction(
            all_logits, [_cat(c) for c in chunks], t_forward, seconds, n_calls, constant
        )


__all__ = [
    "ActivationCache",
    "Engine",
    "Extraction",
    "FeatureKey",
    "LayerActivations",
    "ScoreLike",
    "normalise_activation",
    "predicted_confidence",
]
