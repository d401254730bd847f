"""The local run store: every dashboard Run saved as the CLI's export bundle
(:func:`ood_core.pipeline.export`: config.toml, metrics.csv, confidences.parquet, report.html,
run.json written last) in a folder named by the run's id, listed, read back, compared, deleted.

No Streamlit here. The folder is ``$OOD_LENS_RUNS`` (default ``~/.cache/ood-lens/runs``). A run
read back holds what the bundle holds (:class:`ood_core.bundle.Bundle`: config, metric frame,
confidences, run.json); :func:`ood_core.bundle.to_result` turns it back into the
:class:`~ood_core.pipeline.RunResult` the Results page shows, without fitting or scoring.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ood_core import pipeline, plots
from ood_core.bundle import Bundle, read_bundle
from ood_core.pipeline import RunConfig, RunResult

ENV_RUNS = "OOD_LENS_RUNS"
"""Environment variable naming the run store folder."""
ENV_KEEP = "OOD_LENS_RUNS_KEEP"
"""Environment variable: how many runs the store keeps (the newest; default :data:`KEEP`)."""
KEEP = 50
"""Runs kept by default (a bundle is about 5 MB, most of it the HTML report)."""
HEADLINE = "AUC()"
"""The metric the run list shows (mean over scores and scenarios)."""
_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")


@dataclass(frozen=True)
class StoredRun:
    """A saved run read back: its id and its bundle (config, metric frame as
    ``RunResult.frame``, long confidences, run.json)."""

    run_id: str
    bundle: Bundle

    @property
    def config(self) -> RunConfig:
        return self.bundle.config

    @property
    def metrics(self) -> pd.DataFrame:
        return self.bundle.metrics

    @property
    def confidences(self) -> pd.DataFrame:
        return self.bundle.confidences

    @property
    def info(self) -> dict[str, Any]:
        return self.bundle.info


def runs_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$OOD_LENS_RUNS``, else ``~/.cache/ood-lens/runs``."""
    text = (os.environ if env is None else env).get(ENV_RUNS, "").strip()
    return Path(text).expanduser() if text else Path.home() / ".cache" / "ood-lens" / "runs"


def is_run_id(text: Any) -> bool:
    """``YYYYmmdd-HHMMSS-xxxxxx`` (never a path)."""
    return isinstance(text, str) and bool(_ID.match(text))


def new_id(config_toml: str, when: float | None = None) -> str:
    """Timestamp plus a short hash of the config and the time."""
    now = time.time() if when is None else when
    digest = hashlib.sha256(f"{config_toml}{now!r}{time.perf_counter_ns()}".encode()).hexdigest()
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + "-" + digest[:6]


def keep_count(env: Mapping[str, str] | None = None) -> int:
    """``$OOD_LENS_RUNS_KEEP`` when a whole number >= 1, else :data:`KEEP`."""
    text = (os.environ if env is None else env).get(ENV_KEEP, "").strip()
    try:
        return max(1, int(text))
    except ValueError:
        return KEEP


_PENDING: list[threading.Thread] = []
"""Saves still being written in the background (see :func:`wait_pending`)."""


def save(
    result: RunResult, root: Path | str, keep: int | None = None, background: bool = False
) -> str:
    """Export ``result`` into ``root/<new id>``, then drop all but the newest ``keep`` runs
    (:func:`keep_count`); returns the id. Raises ``TypeError`` / ``ValueError`` when the config
    cannot be written as TOML (e.g. a parameter set to None). ``background``: write the bundle
    (about 0.6 s, mostly the HTML report) in a thread, so that the result shows at once; the
    export's temporary-folder-then-rename makes a run visible only once complete, and
    :func:`wait_pending` waits for the writes (readers of the store call it first)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    text = result.config.to_toml()  # fails here, in the caller, when not writable as TOML
    run_id = new_id(text)

    def write() -> None:
        pipeline.export(result, root / run_id)
        prune(root, keep_count() if keep is None else keep)

    if not background:
        write()
        return run_id
    thread = threading.Thread(target=write, name=f"ood-lens-save-{run_id}", daemon=True)
    _PENDING.append(thread)
    thread.start()
    return run_id


def wait_pending(timeout: float = 60.0) -> None:
    """Wait for the background saves started so far."""
    while _PENDING:
        _PENDING.pop(0).join(timeout)


def prune(root: Path | str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` saved runs; the ids deleted."""
    ids = sorted((p.name for p in Path(root).iterdir() if is_run_id(p.name)), reverse=True)
    gone = ids[max(1, keep) :]
    for run_id in gone:
        delete(root, run_id)
    return gone


def _folder(root: Path | str, run_id: str) -> Path:
    if not is_run_id(run_id):
        raise ValueError(f"Not a run id: {run_id!r}.")
    return Path(root) / run_id


def exists(root: Path | str, run_id: str) -> bool:
    """A complete saved run (its run.json, written last, is there)."""
    return is_run_id(run_id) and (Path(root) / run_id / "run.json").is_file()


def load(root: Path | str, run_id: str, confidences: bool = True) -> StoredRun:
    """The saved run ``run_id`` (``confidences=False``: an empty confidences frame, for a
    quick listing); ``FileNotFoundError`` when there is none, :class:`ood_core.bundle.BundleError`
    (a ``ValueError``) when it cannot be read."""
    wait_pending()
    folder = _folder(root, run_id)
    if not (folder / "run.json").is_file():
        raise FileNotFoundError(f"No saved run {run_id} in {root}.")
    return StoredRun(run_id, read_bundle(folder, confidences=confidences))


def delete(root: Path | str, run_id: str) -> bool:
    """Remove saved run ``run_id``; False when there was none."""
    folder = _folder(root, run_id)
    if not folder.is_dir() or folder.is_symlink():
        return False
    shutil.rmtree(folder)
    return True


def when_text(run_id: str) -> str:
    """``20260101-120000-abcdef`` -> ``2026-01-01 12:00:00``."""
    day, clock = run_id[:8], run_id[9:15]
    return f"{day[:4]}-{day[4:6]}-{day[6:]} {clock[:2]}:{clock[2:4]}:{clock[4:]}"


def headline(metrics: pd.DataFrame, metric: str = HEADLINE) -> float:
    """Mean of ``metric`` over every score and scenario (NaN when the run has none)."""
    values = metrics.loc[metrics["metric"] == metric, "value"]
    return float(values.mean()) if len(values) else float("nan")


def list_runs(root: Path | str) -> pd.DataFrame:
    """One row per complete saved run, newest first: when, model, scores, ``AUROC (mean)``,
    scenarios, data, id (what a reader scans first on the left). Unreadable folders are
    skipped."""
    wait_pending()
    rows = []
    base = Path(root)
    for folder in sorted(base.iterdir(), reverse=True) if base.is_dir() else []:
        if not exists(base, folder.name):
            continue
        try:
            run = load(base, folder.name, confidences=False)
        except (OSError, ValueError, KeyError):
            continue
        cfg = run.config
        rows.append(
            {
                "id": run.run_id,
                "when": when_text(run.run_id),
                "model": f"{cfg.model_entry} ({cfg.model_repo})",
                "data": f"{cfg.ind_dataset} · {cfg.n_calibration} / {cfg.n_test}",
                "scores": ", ".join(dict.fromkeys(run.metrics["score"])),
                "scenarios": ", ".join(dict.fromkeys(run.metrics["ood"])),
                "AUROC (mean)": headline(run.metrics),
            }
        )
    columns = ["when", "model", "scores", "AUROC (mean)", "scenarios", "data", "id"]
    return pd.DataFrame(rows, columns=columns)


def label(run: StoredRun) -> str:
    """A short name of a run: its id and model."""
    return f"{run.run_id} · {run.config.model_entry}"


def compare(a: StoredRun, b: StoredRun) -> pd.DataFrame:
    """Metric values of two runs side by side, matched on (score, layers, ood, metric): columns
    ``A``, ``B`` and ``B - A``; rows only one run has show NaN for the other."""
    keys = ["score", "layers", "ood", "metric"]
    left = a.metrics[[*keys, "value"]].rename(columns={"value": "A"})
    right = b.metrics[[*keys, "value"]].rename(columns={"value": "B"})
    out = left.merge(right, on=keys, how="outer", sort=False)
    out["B - A"] = out["B"] - out["A"]
    return out


RUN_DASHES = {"A": "solid", "B": "dash"}
"""Line dash of each compared run's ROC curves (the colour is the score's)."""


def compare_text(diff: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """:func:`compare` as shown: values with ``digits`` decimals, and ``"not in A"`` /
    ``"not in B"`` (``"-"`` for the difference) where only one run has the row."""
    out = diff.copy()
    for column, missing in (("A", "not in A"), ("B", "not in B")):
        out[column] = [f"{v:.{digits}f}" if v == v else missing for v in diff[column]]
    out["B - A"] = [f"{v:+.{digits}f}" if v == v else "-" for v in diff["B - A"]]
    return out


def roc_styles(names: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Colours and dashes of the overlaid curves ``"<run> · <score>"`` (:func:`roc_inputs`):
    one colour per score (the same score in both runs has the same colour), one dash per run
    (:data:`RUN_DASHES`)."""
    scores = list(dict.fromkeys(n.split(" · ", 1)[-1] for n in names))
    palette = plots.score_colors(scores)
    colors = {n: palette[n.split(" · ", 1)[-1]] for n in names}
    dashes = {n: RUN_DASHES.get(n.split(" · ", 1)[0], "dot") for n in names}
    return colors, dashes


def common_scenarios(a: StoredRun, b: StoredRun) -> list[str]:
    """OoD sets both runs scored (first run's order)."""
    other = set(b.confidences["dataset"])
    return [d for d in dict.fromkeys(a.confidences["dataset"]) if d != "InD" and d in other]


def roc_inputs(runs: Mapping[str, StoredRun], ood: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"<name> · <score>": (InD confidences, OoD confidences)}`` on scenario ``ood`` for every
    score of every run (``runs``: display name -> run), for :func:`ood_core.plots.roc_figure`."""
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, run in runs.items():
        conf = run.confidences
        for score in dict.fromkeys(conf["score"]):
            rows = conf[conf["score"] == score]
            ind = rows.loc[rows["dataset"] == "InD", "confidence"].to_numpy(np.float64)
            ood_c = rows.loc[rows["dataset"] == ood, "confidence"].to_numpy(np.float64)
            if len(ind) and len(ood_c):
                curves[f"{name} · {score}"] = (ind, ood_c)
    return curves
