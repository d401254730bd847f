"""Evaluation pipeline with the reference library's API, on the single-pass engine.

::

    scores_fit = fit_scores(scores_and_layers, net, calib_data, calib_labels)
    confs_ind, confs_oods = compute_confidence(scores_fit, ind=ind, oods=oods, oods_title=titles)
    evals = compute_metrics(confs_ind, confs_oods, metrics)          # (n_scores, n_oods, n_metrics)
    summary_table(evals, scores_and_layers=..., oods_title=titles, metrics=metrics)
    summary_plot(confs_ind, confs_oods, scores_and_layers=..., oods_title=titles)

Shapes: ``confs_ind`` is ``(n_scores, n_ind)``; ``confs_oods`` holds one ``(n_scores, n_ood_i)``
tensor per OoD set. A confidence is the score's conformity at the predicted class (higher = more
in-distribution). Every dataset goes through the network once for all gradient-free scores.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from ood_core.core import OutputKey, StageProgress
from ood_core.evaluation import Evaluation
from ood_core.inputs import InputRange
from ood_core.layer_ids import LayerId, parse_layer_ids
from ood_core.metrics import AUC, AUPR, MCC, TNR, TPR, DetectionError, Metric, compute
from ood_core.plots import summary_plot
from ood_core.report import results_frame, score_label, summary_table
from ood_core.scores.base import BaseScore

ScoresAndLayers = Sequence[tuple[BaseScore, Sequence[LayerId]]]

__all__ = [
    "AUC",
    "AUPR",
    "MCC",
    "TNR",
    "TPR",
    "DetectionError",
    "FittedScores",
    "compute_confidence",
    "compute_metrics",
    "fit_scores",
    "results_frame",
    "score_label",
    "summary",
    "summary_plot",
    "summary_table",
]


class FittedScores(tuple):
    """The fitted ``(score, layers)`` pairs, plus the evaluation that runs them
    (``.evaluation``)."""

    evaluation: Evaluation


def _quiet() -> bool:
    return os.environ.get("OOD_LENS_QUIET", "") not in ("", "0")


class _Bars:
    """Rich progress bars (or a callback, or nothing) for the stages of a run."""

    def __init__(self, progress: bool | StageProgress) -> None:
        self.callback = progress if callable(progress) else None
        self.rich = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            disable=(progress is False or self.callback is not None or _quiet()),
        )

    def __enter__(self) -> _Bars:
        self.rich.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.rich.__exit__(*exc)

    def stage(self, label: str, total: int) -> Callable[[int, int], None]:
        task = self.rich.add_task(label, total=total)

        def update(done: int, n: int) -> None:
            self.rich.update(task, completed=done)
            if self.callback is not None:
                self.callback(label, done, n)

        return update


def _pairs(scores_and_layers: ScoresAndLayers) -> list[tuple[BaseScore, tuple[LayerId, ...]]]:
    pairs = []
    for item in scores_and_layers:
        if not (isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], BaseScore)):
            raise ValueError(
                "scores_and_layers must hold (score, layers) pairs such as "
                f"(KNN(k=15), [(1, 11)]); got {item!r}."
            )
        pairs.append((item[0], tuple(parse_layer_ids(item[1]))))
    return pairs


def fit_scores(
    scores_and_layers: ScoresAndLayers,
    net: nn.Module,
    calib_data: Tensor,
    calib_labels: Tensor | None = None,
    *,
    batch_size: int | None = None,
    progress: bool | StageProgress = True,
    output: OutputKey | None = None,
    input_range: InputRange = None,
) -> FittedScores:
    """Calibrate every score on ``calib_data`` ``(n, ...)`` with one shared forward pass.

    ``calib_labels`` ``(n,)`` default to the network's predictions. ``output``: the element of
    the network's output holding the logits (an index or a key, for a network returning a tuple,
    list, dict or object); ``input_range``: ``(low, high)``, ``"any"`` or None (the model's
    declared range, else ``[0, 1]``), as for :class:`~ood_core.recorder.Recorder`. Returns the
    fitted pairs.
    """
    pairs = _pairs(scores_and_layers)
    if not pairs:
        raise ValueError("fit_scores needs at least one (score, layers) pair.")
    evaluation = Evaluation.for_net(net, calib_data[:1], output=output, input_range=input_range)
    scores = [s for s, _ in pairs]
    evaluation.bind(scores, [layers for _, layers in pairs])
    with _Bars(progress) as bars:
        update = bars.stage(
            f"Fitting {len(scores)} scores... ({len(calib_data)} samples)", len(calib_data)
        )
        evaluation.fit(scores, calib_data, calib_labels, batch_size=batch_size, progress=update)
    out = FittedScores((s, s.layers) for s in scores)
    out.evaluation = evaluation
    return out


def compute_confidence(
    scores_fit: FittedScores | ScoresAndLayers,
    ind: Tensor,
    oods: Sequence[Tensor] = (),
    oods_title: Sequence[str] | None = None,
    *,
    batch_size: int | None = None,
    progress: bool | StageProgress = True,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Confidences of every score on the InD set and each OoD set (one pass per dataset).

    Returns ``confs_ind`` ``(n_scores, n_ind)`` and a tuple of ``(n_scores, n_ood_i)``, float64
    on the CPU.
    """
    pairs = _pairs(scores_fit)
    scores = [s for s, _ in pairs]
    evaluation = getattr(scores_fit, "evaluation", None)
    if evaluation is None:
        recorders = {id(s.recorder_) for s in scores}
        if any(s.recorder_ is None for s in scores) or len(recorders) != 1:
            raise ValueError(
                "compute_confidence needs scores fitted on one network: pass the "
                "output of fit_scores()."
            )
        evaluation = Evaluation(scores[0].recorder_)
    oods = tuple(oods)
    titles = (
        list(oods_title) if oods_title is not None else [f"OoD {i + 1}" for i in range(len(oods))]
    )
    if len(titles) != len(oods):
        raise ValueError(f"{len(oods)} OoD sets but {len(titles)} titles in oods_title.")
    datasets = [("InD", ind), *zip(titles, oods, strict=True)]
    results = []
    with _Bars(progress) as bars:
        for title, data in datasets:
            update = bars.stage(f"Computing confidences: {title} ({len(data)} samples)", len(data))
            _, confs = evaluation.predicted(
                scores, data, batch_size=batch_size, progress=update, dataset=title
            )
            results.append(confs)
    return results[0], tuple(results[1:])


def compute_metrics(
    confs_ind: Tensor | np.ndarray,
    confs_oods: Sequence[Tensor | np.ndarray],
    metrics: Sequence[Metric],
    *,
    score_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Every metric for every (score, OoD set): array ``(n_scores, n_oods, n_metrics)``."""
    ind = np.asarray(confs_ind, dtype=np.float64)
    if ind.ndim != 2:
        raise ValueError(f"confs_ind must be (n_scores, n_ind); got shape {ind.shape}.")
    names = (
        list(score_names) if score_names is not None else [f"score {i}" for i in range(len(ind))]
    )
    out = np.empty((len(ind), len(confs_oods), len(metrics)))
    for j, ood in enumerate(confs_oods):
        ood = np.asarray(ood, dtype=np.float64)
        if ood.ndim != 2 or len(ood) != len(ind):
            raise ValueError(f"confs_oods[{j}] must be ({len(ind)}, n_ood); got shape {ood.shape}.")
        for i in range(len(ind)):
            out[i, j] = compute(metrics, ind[i], ood[i], name=names[i])
    return out


def summary(
    confs_ind: Tensor,
    confs_oods: Sequence[Tensor],
    *,
    scores_and_layers: ScoresAndLayers,
    oods_title: Sequence[str] | None = None,
    metrics: Sequence[Metric] = (AUC(max_fpr=0.2), TPR(max_fpr=0.05)),
    baseline: int | None = None,
    topk: int | None = None,
    convex_hull: bool = False,
    show: bool = True,
) -> dict[str, Any]:
    """Metrics, table and figure at once. ``topk`` keeps the k scores with the best mean first
    metric over OoD sets (plus the baseline). Returns ``{"evals", "table", "figure"}``."""
    pairs = _pairs(scores_and_layers)
    names = [score_label(s, layers) for s, layers in pairs]
    evals = compute_metrics(confs_ind, confs_oods, metrics, score_names=names)
    keep = list(range(len(pairs)))
    if topk is not None and topk < len(pairs):
        order = np.argsort(-evals[:, :, 0].mean(1), kind="stable")
        keep = sorted(set(order[:topk].tolist()) | ({baseline} if baseline is not None else set()))
    sub = [pairs[i] for i in keep]
    base = keep.index(baseline) if baseline is not None and baseline in keep else None
    table = summary_table(
        evals[keep],
        scores_and_layers=sub,
        oods_title=oods_title,
        metrics=metrics,
        baseline=base,
        show=show,
    )
    fig = summary_plot(
        torch.as_tensor(np.asarray(confs_ind))[keep],
        [torch.as_tensor(np.asarray(c))[keep] for c in confs_oods],
        scores_and_layers=sub,
        oods_title=oods_title,
        convex_hull=convex_hull,
    )
    return {"evals": evals, "table": table, "figure": fig}
