"""The one orchestration path from inputs to numbers: bind scores to a network, fit them on
calibration data, compute their confidences on datasets.

``Evaluation(net, example)`` (or :meth:`Evaluation.for_net`) is what the seed API
(:mod:`ood_core.eval`), a score's own ``fit`` / ``__call__`` and the CLI / dashboard pipeline
(:mod:`ood_core.runner`) all call. It runs the passes through an executor
(:class:`~ood_core.engine.Engine`), emits and records the warnings of degenerate fits and tied
confidences (:mod:`ood_core.diagnostics`), and times everything (each score's
:class:`~ood_core.scores.base.ScoreTimer`).

Datasets are tensors or :class:`~ood_core.batches.BatchSource` streams (read batch by batch).
With a :class:`~ood_core.engine.FeatureCache` and keys naming the model and each dataset, each
score's extracted features are reused: changing a parameter its features do not depend on (KNN's
``k``) refits that score with no forward pass, and a score whose features are all cached costs
no pass over the data either.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ood_core.batches import BatchSource
from ood_core.core import (
    Features,
    LayerId,
    OutputKey,
    Progress,
    ScoreProgress,
    Timed,
    check_labels,
    predicted_confidence,
)
from ood_core.diagnostics import collect, degenerate, warn_if_tied
from ood_core.engine import Engine, Extraction, FeatureCache, Sink
from ood_core.inputs import InputRange
from ood_core.recorder import Recorder

if TYPE_CHECKING:  # the scores import this module; the evaluation only calls their hooks
    from ood_core.scores.base import BaseScore


def _feeder(state: Any, labels: Tensor | None) -> Sink:
    """A sink updating a streaming fit ``state`` with each batch's features and labels: the
    rows of ``labels`` at the batch, else those the batch came with, else its predictions."""

    def feed(features: Features, logits: Tensor, batch: Tensor | None, start: int) -> None:
        if labels is not None:
            lab = labels[start : start + len(logits)]
        else:
            lab = batch if batch is not None else logits.argmax(1)
        state.update(features, logits, lab.to(logits.device).long())

    return feed


class Evaluation:
    """Fit and run several scores on one network, one shared forward pass per dataset.

    Args:
        recorder: a :class:`Recorder` on the network (see :meth:`for_net` for a plain network).
        cache: optional feature cache; used when ``model_key`` and a dataset key are given.
        model_key: identity of the network in the cache (e.g. ``(repo, entry)``).
    """

    def __init__(
        self,
        recorder: Recorder,
        cache: FeatureCache | None = None,
        model_key: Hashable | None = None,
        engine: Any | None = None,
    ) -> None:
        self.engine = Engine(recorder) if engine is None else engine
        """What runs the passes: an :class:`~ood_core.engine.Engine` on ``recorder`` unless
        another executor with the same ``extract`` contract is given (``engine``: e.g. an
        ``Engine(recorder, amp="bf16")`` or :class:`ood_core.ray_engine.RayEngine`)."""
        self.recorder = recorder
        self.cache = cache
        self.model_key = model_key
        self.last_shared_seconds: list[float] = []
        """Per score of the last :meth:`fit` / :meth:`confidences` call: its equal share of the
        shared forward pass (0 for scores with their own passes), included in its timer."""
        self.forward_calls = 0
        """Batched forward calls of the shared passes so far (0 while every feature came from
        the cache; the passes of scores with their own, :attr:`own_pass_scores`, not counted)."""
        self.own_pass_scores: list[str] = []
        """The scores that ran their own passes so far (gradients, input perturbations: never
        cached), each named once, in order."""

    @classmethod
    def for_net(
        cls,
        net: Recorder | nn.Module,
        example: Tensor,
        *,
        output: OutputKey | None = None,
        input_range: InputRange = None,
        **kwargs,
    ) -> Evaluation:
        """An evaluation of ``net`` (a Recorder, or a network traced here with the example
        batch ``example``, ``output`` and ``input_range`` as for :class:`Recorder`; nothing is
        stored on the network)."""
        engine = Engine.for_net(net, example, output=output, input_range=input_range)
        return cls(engine.recorder, **kwargs)

    # ------------------------------------------------------------------ binding
    def bind(
        self, scores: Sequence[BaseScore], layers: Sequence[Sequence[LayerId]] | None = None
    ) -> None:
        """Bind each score to this network (validated layers in network order, head weights...),
        with ``layers[i]`` for score ``i`` or, when None, the layers it holds."""
        for i, s in enumerate(scores):
            s.bind(self.recorder, s.layers if layers is None else layers[i])

    # ------------------------------------------------------------------ passes
    def extract(
        self,
        scores: Sequence[BaseScore],
        data: Tensor | BatchSource,
        *,
        batch_size: int | None = None,
        progress: Progress | None = None,
        data_key: Hashable | None = None,
        sinks: dict[int, Sink] | None = None,
    ) -> Extraction:
        """Every score's features on ``data`` (cached features reused when keyed; ``sinks`` as
        :meth:`Engine.extract <ood_core.engine.Engine.extract>`)."""
        ex = self.engine.extract(
            scores,
            data,
            batch_size=batch_size,
            progress=progress,
            cache=self.cache,
            model_key=self.model_key,
            data_key=data_key,
            sinks=sinks,
        )
        self.forward_calls += ex.n_forward_calls
        for s in scores:
            if s.needs_own_pass and repr(s) not in self.own_pass_scores:
                self.own_pass_scores.append(repr(s))
        return ex

    def _share(self, scores: Sequence[BaseScore], ex: Extraction) -> list[float]:
        """Each score's time: its own work plus an equal share of the shared forward passes
        (the shares are kept in :attr:`last_shared_seconds`)."""
        n_plain = max(1, sum(not s.needs_own_pass for s in scores))
        self.last_shared_seconds = [
            0.0 if s.needs_own_pass else ex.seconds_forward / n_plain for s in scores
        ]
        return [
            sec + shared
            for sec, shared in zip(ex.seconds_per_score, self.last_shared_seconds, strict=True)
        ]

    def _checked_labels(self, scores: Sequence[BaseScore], labels: Tensor, n: int | None) -> Tensor:
        """``labels`` as class indices below the network's number of classes, shape ``(n,)``."""
        out = tuple(self.recorder.info((0, 1)).output_size or ())
        hints = [int(getattr(s, "n_classes_hint", 0) or 0) for s in scores]
        limit = max([out[-1] if len(out) == 2 else 0, *hints]) or None  # noqa: PLR2004
        owner = scores[0] if len(scores) == 1 else "calib_labels"
        labels = check_labels(owner, labels, limit)
        if labels.ndim != 1 or (n is not None and len(labels) != n):
            raise ValueError(f"calib_labels must have shape ({n},); got {tuple(labels.shape)}.")
        return labels

    def fit(
        self,
        scores: Sequence[BaseScore],
        data: Tensor | BatchSource,
        labels: Tensor | None = None,
        *,
        batch_size: int | None = None,
        progress: Progress | None = None,
        data_key: Hashable | None = None,
        on_score: ScoreProgress | None = None,
    ) -> Extraction:
        """Bind and calibrate every score on ``data`` (a tensor or a batch source). Labels: the
        given ``labels``, else those the source yields with its batches, else the network's
        predictions. Each score's :class:`~ood_core.diagnostics.OodLensWarning`
        messages are emitted and kept in ``score.fit_warnings``. The calibration preconditions
        (:meth:`~ood_core.scores.base.BaseScore.check_calibration`) are checked before any pass
        when the number of samples is known, else once the stream was read. ``progress``
        follows the pass per batch, ``on_score`` each score's fit after it."""
        self.bind(scores)
        n = len(data) if isinstance(data, Tensor) else data.n
        if labels is None and isinstance(data, BatchSource):
            labels = data.known_labels()
        counts = None
        if labels is not None:  # class indices, checked before anything is allocated for them
            labels = self._checked_labels(scores, labels, n)
            if len(labels):
                counts = torch.bincount(labels).tolist()
        if n is not None:
            for s in scores:  # before any forward pass: fail fast
                s.check_calibration(n, counts)
        states = {i: s.fit_state() for i, s in enumerate(scores) if s.streams_fit()}
        ex = self.extract(
            scores,
            data,
            batch_size=batch_size,
            progress=progress,
            data_key=data_key,
            sinks={i: _feeder(st, labels) for i, st in states.items()},
        )
        if labels is None and ex.labels is not None:  # those the stream came with
            labels = self._checked_labels(scores, ex.labels, len(ex.logits))
            counts = torch.bincount(labels).tolist() if len(labels) else None
        if n is None:  # a stream of unknown length: checked once read, before any fit
            if labels is not None and len(labels) != len(ex.logits):
                raise ValueError(
                    f"calib_labels must have shape ({len(ex.logits)},); got {tuple(labels.shape)}."
                )
            for s in scores:
                s.check_calibration(len(ex.logits), counts)
        shares = self._share(scores, ex)
        for i, (s, feats, share) in enumerate(zip(scores, ex.features, shares, strict=True)):
            if on_score is not None:
                on_score(s, i, len(scores))
            with Timed() as t, collect() as messages:
                for layer in (x for x in s.layers if x in ex.constant_layers):
                    degenerate(
                        s,
                        f"the activation of layer {self.recorder.layer_name(layer)!r} is "
                        f"the same for all {len(ex.logits):,} calibration samples, so it "
                        "contributes nothing",
                        "choose another layer",
                        layer=layer,
                    )
                if i in states:
                    s.fit_from_state(states[i], ex.logits, labels)
                else:
                    s.fit_features(feats, ex.logits, labels)
            s.fit_warnings = messages
            s.timer.add("calibration", len(ex.logits), share + t.seconds)
        return ex

    def confidences(
        self,
        scores: Sequence[BaseScore],
        data: Tensor | BatchSource,
        *,
        batch_size: int | None = None,
        progress: Progress | None = None,
        dataset: str | None = None,
        data_key: Hashable | None = None,
        on_score: ScoreProgress | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """``[(logits (n, C), conformity (n, C))]`` per score, from one shared pass
        (``progress`` follows it per batch, ``on_score`` each score's work after it).

        ``dataset`` names the set in warnings (an :class:`~ood_core.diagnostics.OodLensWarning`
        when all of a score's predicted-class confidences on it are identical).
        """
        for s in scores:
            if s.recorder_ is not self.recorder:
                s.bind(self.recorder, s.layers)
        ex = self.extract(scores, data, batch_size=batch_size, progress=progress, data_key=data_key)
        shares = self._share(scores, ex)
        out = []
        for i, (s, feats, share) in enumerate(zip(scores, ex.features, shares, strict=True)):
            if on_score is not None:
                on_score(s, i, len(scores))
            with Timed() as t:
                conf = s.conformity_from_features(feats, ex.logits)
            if torch.isnan(conf).any():
                raise ValueError(
                    f"{s!r} produced NaN confidences on {int(torch.isnan(conf).any(1).sum())}"
                    " samples; check its parameters and layers (e.g. a singular statistic)."
                )
            s.timer.add("inference", len(ex.logits), share + t.seconds)
            warn_if_tied(s, predicted_confidence(ex.logits, conf), dataset)
            out.append((ex.logits, conf))
        return out

    def predicted(
        self, scores: Sequence[BaseScore], data: Tensor, **kwargs
    ) -> tuple[Tensor, Tensor]:
        """``(logits (n, C), confidences (n_scores, n))``: each score's conformity at the predicted
        class, float64 on the CPU (keyword arguments as :meth:`confidences`)."""
        per_score = self.confidences(scores, data, **kwargs)
        confs = torch.stack([predicted_confidence(lg, c).double().cpu() for lg, c in per_score])
        logits = per_score[0][0] if per_score else torch.empty(0)
        return logits, confs


__all__ = ["Evaluation"]
