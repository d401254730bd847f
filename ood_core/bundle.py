"""An export bundle read back (see :func:`ood_core.pipeline.export`): as data (:class:`Bundle`) and
as the :class:`~ood_core.pipeline.RunResult` it came from, without fitting or scoring anything.

A bundle holds the config (``config.toml``), the metric frame (``metrics.csv``), every confidence
(``confidences.parquet``: score, dataset, sample, confidence) and ``run.json`` (accuracy, InD
predictions, timings, warnings, notes and a fingerprint of the images scored). The images are not
in it: :func:`to_result` draws them again from the config (the same seed draws the same samples)
and checks them against the fingerprint, so that galleries show the samples the confidences
belong to. Labels written by earlier versions (layers as ``(1, 11)``) are read as ``1-11``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ood_core.core import predicted_classes
from ood_core.data import images_sha256
from ood_core.evaluation import Evaluation
from ood_core.layer_ids import layers_text, parse_layer_ids
from ood_core.pipeline import (
    IND_TITLE,
    RunCache,
    RunConfig,
    RunResult,
    load_inputs,
    relabelled,
)
from ood_core.report import score_label

FILES = ("config.toml", "metrics.csv", "confidences.parquet", "run.json")
"""What :func:`read_bundle` reads (``report.html`` is for people)."""


class BundleError(ValueError):
    """A bundle that cannot be read back, or whose data no longer matches it."""


@dataclass(frozen=True)
class Bundle:
    """A bundle's contents: its folder, config, metric frame (as :attr:`RunResult.frame`),
    long confidences frame (empty when not read) and ``run.json``."""

    folder: Path
    config: RunConfig
    metrics: pd.DataFrame
    confidences: pd.DataFrame
    info: dict[str, Any]


def _layers_column(values: pd.Series) -> pd.Series:
    def one(text: str) -> str:
        if not text:
            return text
        try:
            return layers_text(parse_layer_ids(_split_layers(text)))
        except ValueError:
            return text

    return values.map(one)


def _split_layers(text: str) -> list[str]:
    """``"(1, 5), (1, 11)"`` or ``"1-5, 1-11"`` -> its layer ids as text."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p.strip() for p in [*parts, current] if p.strip()]


def read_bundle(folder: str | Path, confidences: bool = True) -> Bundle:
    """Read the bundle in ``folder`` (``confidences=False`` skips the largest file, for quick
    listings). ``FileNotFoundError`` when it is incomplete (``run.json`` is written last);
    :class:`BundleError` when a file cannot be read; :class:`~ood_core.pipeline.ConfigError`
    when its config no longer validates."""
    folder = Path(folder)
    if not (folder / "run.json").is_file():
        raise FileNotFoundError(f"No complete run bundle in {folder} (run.json is missing).")
    try:
        info = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        text = {c: str for c in ("score", "layers", "ood", "metric")}
        metrics = pd.read_csv(folder / "metrics.csv", dtype=text, keep_default_na=False)
        for column in ("value", "ci_low", "ci_high"):
            if column in metrics:
                metrics[column] = pd.to_numeric(metrics[column], errors="coerce")
        if "layers" in metrics:
            metrics["layers"] = _layers_column(metrics["layers"])
        conf = pd.read_parquet(folder / "confidences.parquet") if confidences else pd.DataFrame()
        if "score" in conf:
            conf["score"] = conf["score"].map(relabelled)
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"Cannot read the run bundle in {folder}: {exc}") from exc
    config = RunConfig.from_toml(
        (folder / "config.toml").read_text(encoding="utf-8"), source=str(folder / "config.toml")
    )
    return Bundle(folder, config, metrics, conf, info)


def to_result(
    bundle: Bundle, cache: RunCache | None = None, *, trust_repo: bool = False
) -> RunResult:
    """The :class:`RunResult` a bundle was exported from, read back: confidences, metric frame,
    accuracy, timings, warnings and notes from the bundle; the model and the images loaded
    again through ``cache`` (the scores are built and bound to the network, for their names and
    layers, but not fitted). ``trust_repo``: as for :func:`ood_core.hub.load_model`.

    :class:`BundleError` when the images drawn again differ from those scored (the data changed
    since) or the bundle's parts disagree; run the config again then."""
    if bundle.confidences.empty:
        raise BundleError("This bundle was read without its confidences (confidences=False).")
    cache = cache or RunCache()
    config = bundle.config.validate()
    if trust_repo:
        config = dataclasses.replace(config, trust_repo=True)
    inputs = load_inputs(config, cache)
    info = bundle.info
    expected = info.get("images_sha256")
    if expected and images_sha256([inputs.ind.images, *inputs.oods]) != expected:
        raise BundleError(
            f"The images drawn again from the config of {bundle.folder.name} differ from those it "
            "scored (the model or data changed since): its confidences would be shown beside the "
            "wrong samples. Run its config again to recompute."
        )
    evaluation = Evaluation.for_net(inputs.net, inputs.ind.images[:1])
    pairs = []
    for spec in config.scores:
        score = spec.build()
        score.bind(evaluation.recorder, spec.layer_ids())
        pairs.append((score, score.layers))
    names = [score_label(s, layers, multiline=False) for s, layers in pairs]
    datasets = [IND_TITLE, *inputs.titles]
    conf = bundle.confidences
    arrays: list[np.ndarray] = []
    for dataset, n in zip(datasets, [len(inputs.ind), *map(len, inputs.oods)], strict=True):
        rows = []
        for name in names:
            part = conf[(conf["score"] == name) & (conf["dataset"] == dataset)]
            values = part.sort_values("sample")["confidence"].to_numpy(np.float64)
            if len(values) != n:
                raise BundleError(
                    f"{bundle.folder.name}: {len(values)} confidences of {name!r} on {dataset!r} "
                    f"for {n} samples drawn from its config. Run its config again to recompute."
                )
            rows.append(values)
        arrays.append(np.stack(rows) if rows else np.zeros((0, n)))
    metrics = config.metric_objects()
    frame = bundle.metrics
    shape = (len(names), len(inputs.titles), len(metrics))
    if len(frame) != int(np.prod(shape)):
        raise BundleError(
            f"{bundle.folder.name}: metrics.csv has {len(frame)} rows for {shape[0]} scores x "
            f"{shape[1]} scenarios x {shape[2]} metrics."
        )
    predictions = info.get("ind_predictions")
    if predictions is None or len(predictions) != len(inputs.ind):
        predictions = predicted_classes(inputs.net, inputs.ind.images, config.batch_size or 256)
    timings = info.get("timings", {})
    return RunResult(
        config=config,
        scores_and_layers=pairs,
        score_names=names,
        ood_titles=inputs.titles,
        confs_ind=arrays[0],
        confs_oods=arrays[1:],
        metrics=metrics,
        evals=frame["value"].to_numpy(np.float64).reshape(shape),
        frame=frame,
        timings=pd.DataFrame(
            timings.get("operations", []),
            columns=["score", "operation", "seconds", "shared_seconds"],
        ),
        ind=inputs.ind,
        ood_images=inputs.oods,
        ind_predictions=np.asarray(predictions, dtype=np.int64),
        accuracy=float(info.get("accuracy", float("nan"))),
        seconds=float(timings.get("run_seconds", float("nan"))),
        warnings=list(info.get("warnings", [])),
        notes=list(info.get("notes", [])),
        restored_from=str(bundle.folder),
    )
