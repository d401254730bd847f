"""The single-pass engine: one batched forward pass per dataset feeds every score.

The reference library runs a full forward pass per score per dataset. Here, for a list of scores
(each with its ``layers``), the engine records the union of the layers that all gradient-free
scores need and runs **one** batched ``torch.no_grad`` forward pass per dataset; in that pass each
score turns the batch's activations into small per-sample features (``score.extract``). Scores
that need gradients (``score.needs_grad``) run their own batched passes (``extract_own``).
Memory therefore grows with batch x layer size plus the per-sample features, never with
dataset x raw activation size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import prod

import torch
from torch import Tensor, nn

from ood_core.diagnostics import collect, degenerate, warn_if_tied
from ood_core.inputs import check_inputs
from ood_core.recorder import LayerId, Recorder
from ood_core.scores.base import BaseScore, Features, Timed
from ood_core.tensors import normalise_activation, predicted_confidence

Progress = Callable[[int, int], None]
"""``progress(done, total)``, counts in samples."""

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
    """Runs several scores over datasets with shared forward passes.

    Args:
        recorder: a :class:`Recorder` on the network (one per network; see :meth:`for_net`).
    """

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.net = recorder.net

    @classmethod
    def for_net(cls, net: Recorder | nn.Module, example: Tensor) -> Engine:
        """An engine for ``net`` (a Recorder, or a network whose Recorder is built once and kept
        on it), traced with the example batch ``example``."""
        if isinstance(net, Recorder):
            return cls(net)
        check_inputs(net, example)  # declared shape / dtype / range, before tracing on it
        rec = net.__dict__.get("_ood_lens_recorder")
        if rec is None or tuple(rec.input_shape) != tuple(example.shape[1:]):
            device, dtype = _net_device_dtype(net)
            rec = Recorder(net, input_data=example[:1].to(device=device, dtype=dtype))
            object.__setattr__(net, "_ood_lens_recorder", rec)  # not a submodule
        return cls(rec)

    # ------------------------------------------------------------------ batching
    def auto_batch_size(self, layers: Sequence[LayerId], sample_numel: int) -> int:
        """Batch size keeping one batch's recorded activations within a memory budget
        (256 MiB on CPU, a quarter of the free memory on CUDA), in [16, 1024]."""
        device, dtype = _net_device_dtype(self.net)
        infos = self.recorder._infos  # noqa: SLF001
        numel = sample_numel + sum(
            prod(infos[layer].output_size[1:]) if infos[layer].output_size else 0 for layer in layers
        )
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
        scores: Sequence[BaseScore],
        data: Tensor,
        *,
        batch_size: int | None = None,
        progress: Progress | None = None,
    ) -> Extraction:
        """One pass over ``data`` ``(N, ...)``: logits and every score's per-sample features."""
        rec = self.recorder
        check_inputs(self.net, data, rec.input_shape)
        previous = rec.recording
        plain = [s for s in scores if not s.needs_own_pass]
        union = tuple(dict.fromkeys(layer for s in plain for layer in s.layers))
        rec.record(*union)
        device, dtype = _net_device_dtype(self.net)
        bs = batch_size or self.auto_batch_size(union, prod(data.shape[1:]))
        chunks: list[list[Features]] = [[] for _ in scores]
        logits_chunks: list[Tensor] = []
        seconds = [0.0 for _ in scores]
        t_forward = 0.0
        n_calls = 0
        first: dict[LayerId, Tensor] = {}
        varies = dict.fromkeys(union, False)
        was_training = self.net.training
        self.net.eval()
        try:
            n = len(data)
            for start in range(0, n, bs):
                xb = data[start : start + bs].to(device=device, dtype=dtype)
                with Timed() as t, torch.no_grad():
                    logits = rec(xb)
                t_forward += t.seconds
                n_calls += 1
                if not isinstance(logits, Tensor) or logits.ndim != 2:
                    raise ValueError("The network must return logits of shape (N, n_classes); got "
                                     f"{type(logits).__name__} {getattr(logits, 'shape', '')}.")  # fmt: skip
                acts, inputs = dict(rec.activations), dict(rec.inputs)
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
                            (layer, acts[layer] if s.normalises_concatenation
                             else normalise_activation(acts[layer], s.act_norm)) for layer in s.layers
                        )  # fmt: skip
                        a.inputs = {layer: inputs[layer] for layer in s.layers if layer in inputs}
                        chunks[i].append({k: v.detach() for k, v in s.extract(logits, a).items()})
                    seconds[i] += t.seconds
                for i, s in enumerate(scores):
                    if not s.needs_own_pass:
                        continue
                    with Timed() as t:
                        chunks[i].append({k: v.detach() for k, v in s.extract_own(rec, xb).items()})
                    seconds[i] += t.seconds
                if progress is not None:
                    progress(min(start + bs, n), n)
        finally:
            self.net.train(was_training)
            rec.record(*previous)
        all_logits = torch.cat(logits_chunks)
        if torch.isnan(all_logits).any():
            raise ValueError("The network produced NaN logits on this data; check the inputs' range "
                             "and normalisation.")  # fmt: skip
        constant = tuple(layer for layer, v in varies.items() if not v and layer in first)
        if len(data) < 2:
            constant = ()
        return Extraction(all_logits, [_cat(c) for c in chunks], t_forward, seconds, n_calls,
                          constant)  # fmt: skip

    def _share(self, scores: Sequence[BaseScore], ex: Extraction) -> list[float]:
        """Each score's time: its own work plus an equal share of the shared forward passes."""
        n_plain = max(1, sum(not s.needs_own_pass for s in scores))
        return [sec + (0.0 if s.needs_own_pass else ex.seconds_forward / n_plain)
                for s, sec in zip(scores, ex.seconds_per_score, strict=True)]  # fmt: skip

    def fit(
        self,
        scores: Sequence[BaseScore],
        data: Tensor,
        labels: Tensor | None = None,
        *,
        batch_size: int | None = None,
        progress: Progress | None = None,
        extraction: Extraction | None = None,
    ) -> Extraction:
        """Calibrate every score on ``data`` (labels default to the network's predictions)."""
        for s in scores:
            s.layers = s.check_layers(s.layers, self.recorder)
        ex = extraction or self.extract(scores, data, batch_size=batch_size, progress=progress)
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.ndim != 1 or len(labels) != len(ex.logits):
                raise ValueError(f"calib_labels must have shape ({len(ex.logits)},); got "
                                 f"{tuple(labels.shape)}.")  # fmt: skip
        shares = self._share(scores, ex)
        for s, feats, share in zip(scores, ex.features, shares, strict=True):
            with Timed() as t, collect() as messages:
                for layer in (x for x in s.layers if x in ex.constant_layers):
                    degenerate(s, f"the activation of layer {self.recorder.layer_name(layer)!r} is "
                               f"the same for all {len(ex.logits):,} calibration samples, so it "
                               "contributes nothing", "choose another layer", layer=layer)  # fmt: skip
                s.fit_features(feats, ex.logits, labels)
            s.fit_warnings = messages  # OodLensWarning messages of this fit (also emitted)
            s._recorder = self.recorder  # noqa: SLF001
            s.timer.add("calibration", len(ex.logits), share + t.seconds)
        return ex

    def confidences(
        self,
        scores: Sequence[BaseScore],
        data: Tensor,
        *,
        batch_size: int | None = None,
        progress: Progress | None = None,
        dataset: str | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """``[(logits (n, C), conformity (n, C))]`` per score, from one shared pass.

        ``dataset`` names the set in warnings (:class:`~ood_core.diagnostics.OodLensWarning` when
        all of a score's predicted-class confidences on it are identical).
        """
        ex = self.extract(scores, data, batch_size=batch_size, progress=progress)
        shares = self._share(scores, ex)
        out = []
        for s, feats, share in zip(scores, ex.features, shares, strict=True):
            with Timed() as t:
                conf = s.conformity_from_features(feats, ex.logits)
            if torch.isnan(conf).any():
                raise ValueError(f"{s!r} produced NaN confidences on {int(torch.isnan(conf).any(1).sum())}"
                                 " samples; check its parameters and layers (e.g. a singular statistic).")
            s.timer.add("inference", len(ex.logits), share + t.seconds)
            warn_if_tied(s, predicted_confidence(ex.logits, conf), dataset)
            out.append((ex.logits, conf))
        return out

__all__ = ["Engine", "Extraction", "LayerActivations", "normalise_activation", "predicted_confidence"]
