"""An export bundle read back (written by :func:`ood_core.bundle_writer.export`): as data
(:class:`Bundle`) and as the :class:`~ood_core.runner.RunResult` it came from, without fitting or
scoring anything.

A bundle holds the config (``config.toml``), the metric frame (``metrics.csv``), every confidence
(``confidences.parquet``: score, dataset, sample, confidence) and ``run.json`` (accuracy, InD
predictions, timings, warnings, notes and a fingerprint of the images scored). The images are not
in it: :func:`to_result` draws them again from the config (the same seed draws the same samples)
and checks them against the fingerprint, so that galleries show the samples the confidences
belong to. Labels written by earlier versions (layers as ``(1, 11)``) are read as ``1-11``.

A bundle is a file people share, so nothing in it is taken on trust:

* **Schema.** :func:`read_bundle` checks each file against what ood-lens writes: ``run.json``
  against a pydantic model (:class:`RunInfo`: types, ranges, unknown keys forbidden, at most
  :data:`MAX_JSON_BYTES` and :data:`MAX_JSON_DEPTH` levels), the columns, types and ranges of
  ``metrics.csv`` and ``confidences.parquet`` (no NaN confidence), ``config.toml`` as any config.
* **Consistency.** :func:`to_result` checks the parts against each other and against the config:
  rows in the order ood-lens writes them (every score x dataset x sample, every score x scenario
  x metric), each metric recomputed from the confidences (within :data:`METRIC_TOLERANCE`),
  predictions that are class indices of the model and agree with the accuracy, sample counts.
* **Provenance.** ``run.json``'s ``execution`` (executor, workers, address, resolved device,
  device spec, AMP, host, run id) and ``environment`` (versions, platform, device name) say
  where and how the run was computed; read back into :attr:`RunResult.execution` /
  :attr:`RunResult.environment`. A bundle computed on a GPU opens on a CPU-only machine (the
  model is loaded on the CPU: nothing is recomputed).
* **Trust.** A bundle never grants trust: its config's ``trust_repo`` is only a request
  (:attr:`~ood_core.config.RunConfig.trust_requested`); a non-bundled model repository runs its
  code only when the caller passes ``trust_repo=True``.

Any mismatch raises :class:`BundleError` naming the file, the field and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from ood_core.config import (
    IND_TITLE,
    MAX_CONFIG_CHARS,
    RunConfig,
    _kind,
    _short_key,
    _show,
    relabelled,
)
from ood_core.core import predicted_classes
from ood_core.data import images_sha256
from ood_core.eval import compute_metrics
from ood_core.layer_ids import layers_text, parse_layer_ids
from ood_core.report import score_label
from ood_core.runner import RunCache, RunResult, load_inputs

FILES = ("config.toml", "metrics.csv", "confidences.parquet", "run.json")
"""What :func:`read_bundle` reads (``report.html`` is for people)."""
MAX_JSON_BYTES = 64 * 2**20
"""Largest ``run.json`` read (it holds one prediction per InD test sample: a few MB at most)."""
MAX_JSON_DEPTH = 8
"""Deepest nesting of ``run.json`` (what ood-lens writes has 4 levels)."""
METRIC_TOLERANCE = 1e-9
"""How far a metric in ``metrics.csv`` may be from the one recomputed from the confidences."""
METRICS_COLUMNS = ("score", "layers", "ood", "metric", "value", "ci_low", "ci_high")
"""The columns of ``metrics.csv`` (``ci_low`` / ``ci_high`` may be left out)."""
CONFIDENCES_COLUMNS = ("score", "dataset", "sample", "confidence")
"""The columns of ``confidences.parquet``."""


class BundleError(ValueError):
    """A bundle that cannot be read back, or whose data no longer matches it: the message names
    the file, the field and what was expected."""


# ---------------------------------------------------------------------------- run.json schema
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Operation(_Strict):
    score: str
    operation: str
    seconds: Seconds
    shared_seconds: Seconds | None = None  # not in the earliest bundles


class _Timings(_Strict):
    run_seconds: Seconds | None = None
    export_seconds: Seconds | None = None
    operations: list[_Operation] = Field(default_factory=list)


class _FileDigest(_Strict):
    bytes: int = Field(ge=0)
    sha256: Sha256


class _FileEntry(_Strict):
    name: str = Field(min_length=1)
    bytes: int | None = Field(None, ge=0)
    sha256: Sha256 | None = None


Text = Annotated[str, StringConstraints(max_length=1000)]


class _Execution(_Strict):
    """Where and how a run was computed (:func:`ood_core.runner.execution_record`)."""

    executor: Literal["local", "ray"]
    workers: int = Field(ge=1)
    address: Text = ""
    device: Annotated[str, StringConstraints(pattern=r"^(cpu|cuda:\d+)$")]
    device_spec: Annotated[str, StringConstraints(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] | None = (
        None
    )
    amp: Literal["bf16", "fp16"] | None = None
    host: Text | None = None
    run_id: Text | None = None
    startup_seconds: float | None = Field(None, ge=0, allow_inf_nan=False)
    forward_calls: int | None = Field(None, ge=0)
    """Batched forward calls of the run's shared passes (0: every feature from the cache)."""
    own_pass_scores: list[Text] | None = Field(None, max_length=1000)
    """The scores that ran their own passes (gradients, input perturbations)."""


class RunInfo(_Strict):
    """The schema of ``run.json`` (every key ood-lens has written; unknown keys are refused)."""

    status: Literal["complete"]
    ood_lens_version: str | None = None
    torch_version: str | None = None
    python_version: str | None = None
    config_source: str | None = None
    config_sha256: Sha256 | None = None
    timings: _Timings = Field(default_factory=_Timings)
    accuracy: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    ind_predictions: list[Annotated[int, Field(ge=0)]] | None = None
    images_sha256: Sha256 | None = None
    n_calibration: int | None = Field(None, ge=1)
    n_test: int | None = Field(None, ge=1)
    warnings: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    written_at: str | None = None
    files: dict[str, _FileDigest] | list[str | _FileEntry] | None = None
    execution: _Execution | None = None
    environment: dict[Annotated[str, StringConstraints(max_length=100)], Text] | None = None


_EXPECTED = {  # the "expected ..." of a run.json message, by the last key of its location
    "status": '"complete" (run.json is written last, once the bundle is complete)',
    "accuracy": "a number in [0, 1]",
    "ind_predictions": "a list of predicted class indices (whole numbers >= 0)",
    "n_calibration": "a whole number >= 1, or null",
    "n_test": "a whole number >= 1",
    "warnings": "a list of strings",
    "notes": "a list of strings",
    "sha256": "64 lowercase hex digits",
    "config_sha256": "64 lowercase hex digits",
    "images_sha256": "64 lowercase hex digits",
    "seconds": "a number of seconds >= 0",
    "shared_seconds": "a number of seconds >= 0",
    "run_seconds": "a number of seconds >= 0",
    "export_seconds": "a number of seconds >= 0",
    "operations": "a list of {score, operation, seconds, shared_seconds} tables",
    "timings": "a table {run_seconds, export_seconds, operations}",
    "files": "a table of {bytes, sha256} per file, or a list of file names",
    "bytes": "a whole number of bytes >= 0",
    "execution": "a table {executor, workers, address, device, device_spec, amp, host, run_id}",
    "executor": '"local" or "ray"',
    "workers": "a whole number of workers >= 1",
    "address": "a Ray address of at most 1000 characters",
    "device": 'a resolved device: "cpu" or "cuda:N"',
    "device_spec": '"auto", "cpu", "cuda" or "cuda:N"',
    "amp": 'null, "bf16" or "fp16"',
    "host": "a host name of at most 1000 characters",
    "run_id": "a run id of at most 1000 characters",
    "environment": "a table of versions (name = text)",
}


_KNOWN = {  # the keys of each table of run.json, by the key holding it
    "": RunInfo,
    "timings": _Timings,
    "operations": _Operation,
    "files": _FileDigest,
    "execution": _Execution,
}


def _run_json_problems(where: str, exc: ValidationError) -> list[str]:
    out: list[str] = []
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        if loc and loc[0] == "files" and len(loc) > 1:  # a union: one message for the key
            loc, err = ["files"], {"type": "files"}
        path = "".join(f"[{x}]" if isinstance(x, int) else f".{_short_key(x)}" for x in loc)
        path = path.lstrip(".") or "(the whole file)"
        names = [x for x in loc if isinstance(x, str)]
        last = names[-1] if names else ""
        if err["type"] == "extra_forbidden":
            parent = _KNOWN.get(names[-2] if len(names) > 1 else "", RunInfo)
            msg = f"{where}: unknown key {path}; known keys: {', '.join(parent.model_fields)}"
        elif err["type"] == "files":
            msg = f"{where}: files: expected {_EXPECTED['files']}"
        elif err["type"] == "missing":
            msg = f"{where}: missing key {path}: expected {_EXPECTED.get(last, err['msg'])}"
        else:
            value = err.get("input")
            msg = (
                f"{where}: {path} = {_show(value)} ({_kind(value)}): expected "
                f"{_EXPECTED.get(last, err['msg'].replace('Input should be ', ''))}"
            )
        if msg not in out:
            out.append(msg)
    return out


def _json_depth(value: Any) -> int:
    """The nesting depth of parsed JSON (iterative)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            stack += [(x, depth + 1) for x in (v.values() if isinstance(v, dict) else v)]
    return deepest


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {_show(key)} appears twice")
        out[key] = value
    return out


def _read_run_json(path: Path) -> dict[str, Any]:
    """``run.json`` parsed and checked against :class:`RunInfo`, or :class:`BundleError`."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise BundleError(
            f"{path}: {size:,} bytes; a bundle's run.json is at most {MAX_JSON_BYTES:,} bytes"
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise BundleError(
            f"{path}: nested more than {MAX_JSON_DEPTH} levels deep; expected the run.json "
            "ood-lens writes"
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise BundleError(
            f"{path}: not valid JSON ({exc}); expected the run.json ood-lens writes"
        ) from None
    if not isinstance(info, dict):
        raise BundleError(f"{path}: {_kind(info)}; expected a JSON object (a table of keys)")
    if (depth := _json_depth(info)) > MAX_JSON_DEPTH:
        raise BundleError(
            f"{path}: nested {depth}+ levels deep; at most {MAX_JSON_DEPTH} (expected the "
            "run.json ood-lens writes)"
        )
    try:
        RunInfo.model_validate(info)
    except ValidationError as exc:
        raise BundleError(_problems_text(_run_json_problems(str(path), exc))) from None
    return info


def _problems_text(problems: list[str], shown: int = 10) -> str:
    if len(problems) == 1:
        return problems[0]
    text = f"{len(problems):,} problems:\n" + "\n".join(f"  - {p}" for p in problems[:shown])
    if len(problems) > shown:
        text += f"\n  - ... and {len(problems) - shown:,} more"
    return text


# ---------------------------------------------------------------------------- the table files
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


def _number(text: str) -> float:
    """A number of metrics.csv: ``""`` (no value) is NaN; anything else must parse."""
    return math.nan if text.strip() == "" else float(text)


def _read_metrics(path: Path) -> pd.DataFrame:
    """``metrics.csv``: the known columns, text where text belongs, numbers in [0, 1] (or empty)."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # pandas' ParserError is one
        raise BundleError(f"Cannot read {path}: {exc}") from exc
    columns = list(frame.columns)
    unknown = [c for c in columns if c not in METRICS_COLUMNS]
    missing = [c for c in METRICS_COLUMNS[:5] if c not in columns]
    if unknown or missing:
        raise BundleError(
            f"{path}: "
            + "; ".join(
                [f"unknown column(s) {[_short_key(c) for c in unknown[:10]]}"] * bool(unknown)
                + [f"missing column(s) {missing}"] * bool(missing)
            )
            + f"; expected the columns {', '.join(METRICS_COLUMNS)} (ci_low, ci_high optional)"
        )
    for column in ("score", "metric", "ood"):
        empty = np.flatnonzero(frame[column].str.strip() == "")
        if len(empty):
            raise BundleError(
                f"{path} line {empty[0] + 2}, column {column}: empty; expected a {column} label"
            )
    for column in ("value", "ci_low", "ci_high"):
        if column not in frame:
            frame[column] = math.nan
            continue
        values = np.empty(len(frame))
        for row, text in enumerate(frame[column]):
            try:
                values[row] = _number(text)
            except ValueError:
                values[row] = -1.0  # reported below
            if not (math.isnan(values[row]) or 0.0 <= values[row] <= 1.0):
                raise BundleError(
                    f"{path} line {row + 2}, column {column} = {_show(text)}: expected a metric "
                    "value in [0, 1] (or empty for none)"
                )
        frame[column] = values
    bad = np.flatnonzero(frame["ci_low"].to_numpy() > frame["ci_high"].to_numpy())
    if len(bad):
        row = bad[0]
        raise BundleError(
            f"{path} line {row + 2}: ci_low = {float(frame['ci_low'].iloc[row])!r} is above ci_high = "
            f"{float(frame['ci_high'].iloc[row])!r}; expected an interval low <= high"
        )
    frame["layers"] = _layers_column(frame["layers"])
    return frame[[c for c in METRICS_COLUMNS if c in frame]]


def _read_confidences(path: Path) -> pd.DataFrame:
    """``confidences.parquet``: the four columns with their types; no NaN, samples >= 0."""
    try:
        conf = pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise BundleError(f"Cannot read {path}: {exc}") from exc
    columns = list(conf.columns)
    if sorted(map(str, columns)) != sorted(CONFIDENCES_COLUMNS):
        raise BundleError(
            f"{path}: columns {[_short_key(c) for c in columns[:10]]}; expected exactly the "
            f"columns {', '.join(CONFIDENCES_COLUMNS)}"
        )
    for column in ("score", "dataset"):
        if not pd.api.types.is_string_dtype(conf[column]):
            raise BundleError(f"{path}: column {column} holds {conf[column].dtype}; expected text")
    kinds = {"sample": ("i", "u"), "confidence": ("f",)}
    expected = {"sample": "whole numbers >= 0", "confidence": "floating-point numbers"}
    for column, allowed in kinds.items():
        if conf[column].dtype.kind not in allowed:
            raise BundleError(
                f"{path}: column {column} holds {conf[column].dtype}; expected {expected[column]}"
            )
    if len(negative := np.flatnonzero(conf["sample"].to_numpy() < 0)):
        raise BundleError(
            f"{path} row {negative[0]}: sample = {conf['sample'].iloc[negative[0]]}; expected a "
            "sample index >= 0"
        )
    nan = np.flatnonzero(np.isnan(conf["confidence"].to_numpy(np.float64)))
    if len(nan):
        row = conf.iloc[nan[0]]
        raise BundleError(
            f"{path}: {len(nan):,} confidence(s) are NaN (first: row {nan[0]}, score "
            f"{row['score']!r}, dataset {row['dataset']!r}, sample {row['sample']}); expected a "
            "number for every sample (ood-lens never writes NaN)"
        )
    conf["score"] = conf["score"].map(relabelled)
    return conf


# ---------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Bundle:
    """A bundle's contents: its folder, config, metric frame (as :attr:`RunResult.frame`),
    long confidences frame (empty when not read) and ``run.json`` (checked: :class:`RunInfo`)."""

    folder: Path
    config: RunConfig
    metrics: pd.DataFrame
    confidences: pd.DataFrame
    info: dict[str, Any]


def read_bundle(folder: str | Path, confidences: bool = True) -> Bundle:
    """Read the bundle in ``folder`` and check each file's schema (``confidences=False`` skips
    the largest file, for quick listings). ``FileNotFoundError`` when it is incomplete
    (``run.json`` is written last); :class:`BundleError` when a file is missing, cannot be read
    or does not hold what ood-lens writes; :class:`~ood_core.config.ConfigError` when its
    config does not validate. The config's ``trust_repo`` is never consent (module docstring)."""
    folder = Path(folder)
    if not (folder / "run.json").is_file():
        raise FileNotFoundError(f"No complete run bundle in {folder} (run.json is missing).")
    needed = [name for name in FILES if confidences or name != "confidences.parquet"]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise BundleError(
            f"Cannot read the run bundle in {folder}: {', '.join(missing)} missing; a bundle "
            f"holds {', '.join(FILES)}"
        )
    try:
        info = _read_run_json(folder / "run.json")
        metrics = _read_metrics(folder / "metrics.csv")
        conf = _read_confidences(folder / "confidences.parquet") if confidences else pd.DataFrame()
        config_path = folder / "config.toml"
        if config_path.stat().st_size > MAX_CONFIG_CHARS * 4:
            raise BundleError(f"{config_path}: too large for a run config")
        text = config_path.read_bytes().decode("utf-8")
    except BundleError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"Cannot read the run bundle in {folder}: {exc}") from exc
    config = RunConfig.from_toml(text, source=str(config_path))
    return Bundle(folder, config, metrics, conf, info)


# ---------------------------------------------------------------------------- read back
def _first_mismatch(got: list[tuple], expected: list[tuple]) -> int | None:
    for row, (a, b) in enumerate(zip(got, expected, strict=False)):
        if a != b:
            return row
    return None if len(got) == len(expected) else min(len(got), len(expected))


def _check_confidences(
    bundle: Bundle, names: list[str], datasets: list[str], sizes: list[int]
) -> list[np.ndarray]:
    """The confidences as one ``(n_scores, n)`` array per dataset, once the file is found to
    hold every score x dataset x sample in the order ood-lens writes them."""
    path = bundle.folder / "confidences.parquet"
    conf = bundle.confidences
    counts = conf.groupby(["score", "dataset"], sort=False).size()
    for dataset, n in zip(datasets, sizes, strict=True):
        for name in names:
            got = int(counts.get((name, dataset), 0))
            if got != n:
                raise BundleError(
                    f"{path}: {got} confidences of {name!r} on {dataset!r} for {n} samples "
                    "drawn from its config. Run its config again to recompute."
                )
    if len(conf) != len(names) * sum(sizes):
        raise BundleError(
            f"{path}: {len(conf):,} rows for {len(names)} score(s) x the {sum(sizes):,} samples "
            "of its datasets; expected no other rows"
        )
    want_score = np.concatenate([np.repeat(names, n) for n in sizes]) if names else []
    want_dataset = np.concatenate(
        [np.repeat(d, len(names) * n) for d, n in zip(datasets, sizes, strict=True)]
    )
    want_sample = np.concatenate([np.tile(np.arange(n), len(names)) for n in sizes])
    ok = (
        (conf["score"].to_numpy(object) == np.asarray(want_score, dtype=object))
        & (conf["dataset"].to_numpy(object) == want_dataset.astype(object))
        & (conf["sample"].to_numpy(np.int64) == want_sample)
    )
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        got = conf.iloc[row]
        raise BundleError(
            f"{path} row {row}: (score {got['score']!r}, dataset {got['dataset']!r}, sample "
            f"{got['sample']}); expected (score {str(want_score[row])!r}, dataset "
            f"{str(want_dataset[row])!r}, sample {want_sample[row]}): ood-lens writes each dataset's "
            "scores in config order, samples in order (rows reordered or edited?)"
        )
    values = conf["confidence"].to_numpy(np.float64)
    arrays, start = [], 0
    for n in sizes:
        block = values[start : start + len(names) * n]
        arrays.append(block.reshape(len(names), n) if names else np.zeros((0, n)))
        start += len(names) * n
    return arrays


def _check_metrics(
    bundle: Bundle,
    pairs: list[tuple[Any, tuple]],
    names: list[str],
    titles: list[str],
    metrics: list[Any],
    arrays: list[np.ndarray],
) -> np.ndarray:
    """The metric values ``(n_scores, n_scenarios, n_metrics)`` recomputed from the confidences,
    once ``metrics.csv`` is found to hold the same values, one row per score x scenario x metric
    in the order ood-lens writes them."""
    path = bundle.folder / "metrics.csv"
    frame = bundle.metrics
    shape = (len(names), len(titles), len(metrics))
    if len(frame) != int(np.prod(shape)):
        raise BundleError(
            f"{path}: {len(frame)} rows for {shape[0]} scores x {shape[1]} scenarios x "
            f"{shape[2]} metrics; expected one row each."
        )
    key_columns = ["score", "layers", "ood", "metric"]
    expected = [
        (repr(score), layers_text(layers), title, repr(metric))
        for score, layers in pairs
        for title in titles
        for metric in metrics
    ]
    got = list(frame[key_columns].itertuples(index=False, name=None))
    if (row := _first_mismatch(got, expected)) is not None:
        raise BundleError(
            f"{path} line {row + 2}: (score, layers, ood, metric) = {got[row]!r}; expected "
            f"{expected[row]!r}: ood-lens writes one row per score x scenario x metric of the "
            "config, in its order (rows reordered or edited?)"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run reported its degenerate sets already
        evals = compute_metrics(arrays[0], arrays[1:], metrics, score_names=names)
    stored = frame["value"].to_numpy(np.float64).reshape(shape)
    same = np.isclose(stored, evals, rtol=0.0, atol=METRIC_TOLERANCE, equal_nan=True)
    if not same.all():
        i, j, k = (int(x[0]) for x in np.nonzero(~same))
        row = (i * shape[1] + j) * shape[2] + k
        raise BundleError(
            f"{path} line {row + 2}: value = {float(stored[i, j, k])!r} for {names[i]!r} on "
            f"{titles[j]!r} ({expected[row][3]}); expected {float(evals[i, j, k])!r}, the metric of the "
            "confidences in confidences.parquet: the two files disagree (edited?)"
        )
    return evals


def _check_predictions(
    bundle: Bundle, info: dict[str, Any], predictions: np.ndarray, labels: np.ndarray, n_out: int
) -> float:
    """The accuracy, once the stored predictions are found to be class indices of the model
    and to agree with the stored accuracy."""
    path = bundle.folder / "run.json"
    if len(bad := np.flatnonzero(predictions >= n_out)):
        raise BundleError(
            f"{path}: ind_predictions[{bad[0]}] = {predictions[bad[0]]}; expected a class index "
            f"below {n_out} (the model's number of outputs)"
        )
    accuracy = float((predictions == labels).mean())
    stored = info.get("accuracy")
    if stored is not None and abs(stored - accuracy) > METRIC_TOLERANCE:
        raise BundleError(
            f"{path}: accuracy = {stored!r}; expected {accuracy!r}, the accuracy of its "
            "ind_predictions on the InD test labels (edited?)"
        )
    return accuracy


def to_result(
    bundle: Bundle, cache: RunCache | None = None, *, trust_repo: bool = False
) -> RunResult:
    """The :class:`RunResult` a bundle was exported from, read back: confidences, metric frame,
    accuracy, timings, warnings and notes from the bundle; the model and the images loaded
    again through ``cache`` (the scores are built and bound to the network, for their names and
    layers, but not fitted). ``trust_repo``: as for :func:`ood_core.hub.load_model`, and the only
    source of trust: the bundle's own ``trust_repo`` is never consulted.

    :class:`BundleError` when the images drawn again differ from those scored (the data changed
    since) or the bundle's parts disagree with each other or with the config (module docstring);
    run the config again then."""
    if bundle.confidences.empty:
        raise BundleError("This bundle was read without its confidences (confidences=False).")
    cache = cache or RunCache()
    config = dataclasses.replace(bundle.config.validate(), trust_repo=trust_repo is True)
    # on the CPU whatever device computed it: the model only names and binds the scores here
    inputs = load_inputs(config, cache, torch.device("cpu"))
    info = bundle.info
    run_json = bundle.folder / "run.json"
    expected = info.get("images_sha256")
    if expected and images_sha256([inputs.ind.images, *inputs.oods]) != expected:
        raise BundleError(
            f"The images drawn again from the config of {bundle.folder.name} differ from those it "
            "scored (the model or data changed since): its confidences would be shown beside the "
            "wrong samples. Run its config again to recompute."
        )
    if info.get("n_test") is not None and info["n_test"] != len(inputs.ind):
        raise BundleError(
            f"{run_json}: n_test = {info['n_test']}; expected {len(inputs.ind)}, the InD test "
            "samples its config draws"
        )
    recorder = cache.recorder(config.model_key(), inputs.net, inputs.ind.images[:1])
    pairs = []
    for spec in config.scores:
        score = spec.build()
        score.bind(recorder, spec.layer_ids())
        pairs.append((score, score.layers))
    names = [score_label(s, layers, multiline=False) for s, layers in pairs]
    datasets = [IND_TITLE, *inputs.titles]
    sizes = [len(inputs.ind), *map(len, inputs.oods)]
    arrays = _check_confidences(bundle, names, datasets, sizes)
    metrics = config.metric_objects()
    evals = _check_metrics(bundle, pairs, names, inputs.titles, metrics, arrays)
    labels = inputs.ind.labels.numpy()
    stored = info.get("ind_predictions")
    if stored is None:  # earlier bundles: predicted again
        predictions = predicted_classes(inputs.net, inputs.ind.images, config.batch_size or 256)
        accuracy = float(info.get("accuracy", (predictions == labels).mean()))
    else:
        if len(stored) != len(inputs.ind):
            raise BundleError(
                f"{run_json}: ind_predictions holds {len(stored)} predictions; expected one per "
                f"InD test sample ({len(inputs.ind)})"
            )
        predictions = np.asarray(stored, dtype=np.int64)
        out = tuple(recorder.info((0, 1)).output_size)
        n_out = max(len(inputs.ind.class_names), out[-1] if len(out) == 2 else 0)
        accuracy = _check_predictions(bundle, info, predictions, labels, n_out)
    timings = info.get("timings", {})
    return RunResult(
        config=config,
        scores_and_layers=pairs,
        score_names=names,
        ood_titles=inputs.titles,
        confs_ind=arrays[0],
        confs_oods=arrays[1:],
        metrics=metrics,
        evals=evals,
        frame=bundle.metrics,
        timings=pd.DataFrame(
            timings.get("operations", []),
            columns=["score", "operation", "seconds", "shared_seconds"],
        ),
        ind=inputs.ind,
        ood_images=inputs.oods,
        ind_predictions=predictions,
        accuracy=accuracy,
        seconds=float("nan") if timings.get("run_seconds") is None else timings["run_seconds"],
        warnings=list(info.get("warnings", [])),
        notes=list(info.get("notes", [])),
        restored_from=str(bundle.folder),
        execution=dict(info.get("execution") or {}),
        environment=dict(info.get("environment") or {}),
    )
