"""The local run store: every dashboard Run saved as the CLI's export bundle
(:func:`ood_core.bundle_writer.export`: config.toml, metrics.csv, confidences.parquet, report.html,
run.json written last) in a folder named by the run's id, listed, read back, deleted (compared:
:mod:`ood_lens_app.compare`).

No Streamlit here. The folder is ``$OOD_LENS_RUNS`` (default ``~/.cache/ood-lens/runs``). A save
never fails silently: :func:`save` raises :class:`StoreError` when the folder cannot take a run,
and a background save that fails later (a full disk) is reported by :func:`save_error`, both as
"not saved: <reason>; set OOD_LENS_RUNS to a writable folder". Ids sort strictly by creation
time (microseconds, increasing within the process), so pruning to ``$OOD_LENS_RUNS_KEEP`` keeps
the newest runs and never deletes the run being saved. A run
read back holds what the bundle holds (:class:`ood_core.bundle.Bundle`: config, metric frame,
confidences, run.json); :func:`ood_core.bundle.to_result` turns it back into the
:class:`~ood_core.runner.RunResult` the Results page shows, without fitting or scoring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ood_core import bundle_writer
from ood_core.bundle import Bundle, read_bundle
from ood_core.config import RunConfig
from ood_core.runner import RunResult

ENV_RUNS = "OOD_LENS_RUNS"
"""Environment variable naming the run store folder."""
ENV_KEEP = "OOD_LENS_RUNS_KEEP"
"""Environment variable: how many runs the store keeps (the newest; default :data:`KEEP`)."""
KEEP = 50
"""Runs kept by default (a bundle is about 5 MB, most of it the HTML report)."""
HEADLINE = "AUC()"
"""The metric the run list shows (mean over scores and scenarios)."""
_ID = re.compile(r"^\d{8}-\d{6}(-\d{6})?-[0-9a-f]{6}$")
"""``YYYYmmdd-HHMMSS-uuuuuu-xxxxxx`` (microseconds, then a hash); ids of earlier versions have no
microseconds."""
LOG = logging.getLogger("ood_lens.app")


class StoreError(OSError):
    """A run could not be saved to the store; the message says why and what to do."""


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
    """``YYYYmmdd-HHMMSS-uuuuuu-xxxxxx`` or, from earlier versions, ``YYYYmmdd-HHMMSS-xxxxxx``
    (never a path)."""
    return isinstance(text, str) and bool(_ID.match(text))


_CLOCK = threading.Lock()
_LAST_US = 0


def new_id(config_toml: str, when: float | None = None) -> str:
    """Local time to the microsecond plus a short hash of the config; ids made by this process
    strictly increase (two in the same microsecond get consecutive ones), so sorting ids sorts
    runs by creation time (:func:`sort_key`)."""
    global _LAST_US
    with _CLOCK:
        us = time.time_ns() // 1000 if when is None else int(round(when * 1e6))
        if when is None:
            us = max(us, _LAST_US + 1)
            _LAST_US = us
    seconds, micro = divmod(us, 1_000_000)
    digest = hashlib.sha256(f"{config_toml}{us}{secrets.token_hex(4)}".encode()).hexdigest()
    return f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(seconds))}-{micro:06d}-{digest[:6]}"


def sort_key(run_id: str) -> tuple[str, int]:
    """Creation order of ids: the timestamp, then the microseconds (0 for earlier ids); never
    the random hash."""
    parts = run_id.split("-")
    micro = int(parts[2]) if len(parts) == 4 else 0
    return f"{parts[0]}-{parts[1]}", micro


def not_saved(root: Path | str, exc: BaseException) -> str:
    """The message of a run that could not be saved in ``root``: why, and what to do."""
    if isinstance(exc, StoreError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        reason = f"{exc.strerror}{where}"
    else:
        reason = str(exc) or type(exc).__name__
    return (
        f"This run was not saved to the run store {root}: {reason}; set {ENV_RUNS} to a writable "
        "folder (then Run again)."
    )


def check_root(root: Path | str) -> Path:
    """Create the store folder if needed and prove it takes files (creates and removes a probe
    file); :class:`StoreError` saying why when it cannot (a path under a file, ``/proc``, a
    read-only place)."""
    root = Path(root)
    probe = root / f".ood-lens-probe-{secrets.token_hex(4)}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise StoreError(not_saved(root, exc)) from exc
    return root


def keep_count(env: Mapping[str, str] | None = None) -> int:
    """``$OOD_LENS_RUNS_KEEP`` when a whole number >= 1, else :data:`KEEP`."""
    text = (os.environ if env is None else env).get(ENV_KEEP, "").strip()
    try:
        return max(1, int(text))
    except ValueError:
        return KEEP


_PENDING: list[threading.Thread] = []
"""Saves still being written in the background (see :func:`wait_pending`)."""
_SAVING: dict[str, threading.Thread] = {}
"""Background save of each run id started by this process (see :func:`save_error`)."""
_FAILED: dict[str, str] = {}
"""Run id -> why its save failed (:func:`not_saved`)."""


def save(
    result: RunResult, root: Path | str, keep: int | None = None, background: bool = False
) -> str:
    """Export ``result`` into ``root/<new id>``, then drop all but the newest ``keep`` runs
    (:func:`keep_count`; never the run just saved); returns the id, which also becomes the
    ``run_id`` of ``result.execution`` (its provenance).

    Raises ``TypeError`` / ``ValueError`` when the config cannot be written as TOML (e.g. a
    parameter set to None) and :class:`StoreError` (an ``OSError``) when the store cannot take
    the run (:func:`check_root`; or, without ``background``, when writing it fails).
    ``background``: write the bundle (about 0.6 s, mostly the HTML report) in a thread, so that
    the result shows at once; the export's temporary-folder-then-rename makes a run visible only
    once complete; :func:`save_error` says whether it was saved, and :func:`wait_pending` waits
    for the writes (readers of the store call it first)."""
    text = result.config.to_toml()  # fails here, in the caller, when not writable as TOML
    root = check_root(root)
    run_id = new_id(text)
    if result.execution:  # the run's id is its id in the store
        result.execution["run_id"] = run_id

    def write() -> None:
        try:
            bundle_writer.export(result, root / run_id)
        except Exception as exc:  # noqa: BLE001 - reported by save_error, never lost silently
            _FAILED[run_id] = not_saved(root, exc)
            LOG.error("Run %s not saved: %s", run_id, exc)
            if not background:
                raise StoreError(_FAILED[run_id]) from exc
            return
        try:
            prune(root, keep_count() if keep is None else keep, protect=(run_id,))
        except OSError as exc:  # the run is saved; older ones stay
            LOG.warning("Could not prune the run store %s: %s", root, exc)

    if not background:
        write()
        return run_id
    thread = threading.Thread(target=write, name=f"ood-lens-save-{run_id}", daemon=True)
    _PENDING.append(thread)
    _SAVING[run_id] = thread
    thread.start()
    return run_id


def save_error(run_id: str, timeout: float = 30.0) -> str | None:
    """Why the save of ``run_id`` failed (:func:`not_saved`: "... not saved ...: <reason>; set
    OOD_LENS_RUNS to a writable folder"), or None once it is saved (or when this process
    started no save of it). Waits up to ``timeout`` seconds for a background save still being
    written (see :func:`is_saving`)."""
    thread = _SAVING.get(run_id)
    if thread is not None:
        thread.join(timeout)
        if not thread.is_alive():
            _SAVING.pop(run_id, None)
    return _FAILED.get(run_id)


def is_saving(run_id: str) -> bool:
    """A background save of ``run_id`` is still being written."""
    thread = _SAVING.get(run_id)
    return thread is not None and thread.is_alive()


def wait_pending(timeout: float = 60.0) -> None:
    """Wait for the background saves started so far."""
    while _PENDING:
        _PENDING.pop(0).join(timeout)


def prune(root: Path | str, keep: int, protect: tuple[str, ...] = ()) -> list[str]:
    """Delete all but the newest ``keep`` saved runs (by creation time, :func:`sort_key`), never
    one in ``protect`` (the run just saved); the ids deleted."""
    ids = sorted((p.name for p in Path(root).iterdir() if is_run_id(p.name)), key=sort_key)
    ids.reverse()
    gone = [run_id for run_id in ids[max(1, keep) :] if run_id not in protect]
    for run_id in gone:
        delete(root, run_id)
    _forget_names(root, gone)
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


TRASH = ".trash"
"""Sub-folder of the store holding deleted runs until they can no longer be undone."""


def trash(root: Path | str, run_id: str) -> bool:
    """Delete saved run ``run_id`` so that :func:`restore` can undo it: the folder is moved
    (one rename) into the store's :data:`TRASH`; False when there was none."""
    folder = _folder(root, run_id)
    if not folder.is_dir() or folder.is_symlink():
        return False
    bin_ = Path(root) / TRASH
    bin_.mkdir(exist_ok=True)
    target = bin_ / run_id
    if target.exists():
        shutil.rmtree(target)
    folder.rename(target)
    return True


def restore(root: Path | str, run_id: str) -> bool:
    """Undo :func:`trash` of ``run_id`` (False when it is no longer in the trash)."""
    if not is_run_id(run_id):
        raise ValueError(f"not a run id: {run_id!r}")
    source = Path(root) / TRASH / run_id
    if not source.is_dir() or source.is_symlink() or _folder(root, run_id).exists():
        return False
    source.rename(_folder(root, run_id))
    return True


def empty_trash(root: Path | str, keep: str | None = None) -> list[str]:
    """Delete for good every trashed run but ``keep`` (the one still undoable); their ids."""
    bin_ = Path(root) / TRASH
    gone = []
    for folder in sorted(bin_.iterdir()) if bin_.is_dir() else []:
        if folder.name != keep and is_run_id(folder.name) and not folder.is_symlink():
            shutil.rmtree(folder)
            gone.append(folder.name)
    _forget_names(root, gone)
    return gone


def when_text(run_id: str) -> str:
    """``20260101-120000-abcdef`` -> ``2026-01-01 12:00:00``."""
    day, clock = run_id[:8], run_id[9:15]
    return f"{day[:4]}-{day[4:6]}-{day[6:]} {clock[:2]}:{clock[2:4]}:{clock[4:]}"


def headline(metrics: pd.DataFrame, metric: str = HEADLINE) -> float:
    """Mean of ``metric`` over every score and scenario (NaN when the run has none)."""
    values = metrics.loc[metrics["metric"] == metric, "value"]
    return float(values.mean()) if len(values) else float("nan")


LIST_COLUMNS = [
    "when",
    "name",
    "model",
    "scores",
    "AUROC (mean)",
    "scenarios",
    "data",
    "computed",
    "id",
]
"""The columns of :func:`list_runs` (what a reader scans first on the left)."""


def computed_text(info: Mapping[str, Any]) -> str:
    """Where and how a run was computed, in a few words (from run.json's ``execution`` and
    ``environment``): ``"local · cpu · host vm"``, ``"ray ×2 · cuda:0 (NVIDIA H200) · bf16 ·
    host gpu1"``; ``"not recorded"`` for a bundle written before it was kept."""
    ex = info.get("execution") or {}
    if not ex:
        return "not recorded"
    env = info.get("environment") or {}
    parts = [ex.get("executor", "?")]
    if ex.get("executor") == "ray":
        parts[0] += f" ×{ex.get('workers')}"
    device = str(ex.get("device", "?"))
    if device.startswith("cuda") and env.get("device_name"):
        device += f" ({env['device_name']})"
    parts.append(device)
    if ex.get("amp"):
        parts.append(str(ex["amp"]))
    if ex.get("host"):
        parts.append(f"host {ex['host']}")
    return " · ".join(parts)


def provenance_frame(info: Mapping[str, Any]) -> pd.DataFrame:
    """Every recorded setting of where and how a run was computed, one ``setting, value`` row
    each (run.json's ``execution``, then ``environment``, then the versions of earlier
    bundles)."""
    rows = [(k, "" if v is None else str(v)) for k, v in (info.get("execution") or {}).items()]
    rows += [(k, str(v)) for k, v in (info.get("environment") or {}).items()]
    if not info.get("environment"):
        for key in ("ood_lens_version", "torch_version", "python_version"):
            if info.get(key):
                rows.append((key.removesuffix("_version"), str(info[key])))
    return pd.DataFrame(rows, columns=["setting", "value"])


def run_row(run: StoredRun, when: str) -> dict[str, Any]:
    """One row of :func:`list_runs` for ``run`` (``when``: its creation time as text)."""
    cfg = run.config
    return {
        "id": run.run_id,
        "when": when,
        "name": "",
        "model": f"{cfg.model_entry} ({cfg.model_repo})",
        "data": f"{cfg.ind_dataset} · {cfg.n_calibration} / {cfg.n_test}",
        "scores": ", ".join(dict.fromkeys(run.metrics["score"])),
        "scenarios": ", ".join(dict.fromkeys(run.metrics["ood"])),
        "AUROC (mean)": headline(run.metrics),
        "computed": computed_text(run.info),
    }


def list_runs(root: Path | str) -> pd.DataFrame:
    """One row per complete saved run, newest first (:data:`LIST_COLUMNS`: when, model,
    scores, ``AUROC (mean)``, scenarios, data, where it was computed, id). Unreadable folders
    are skipped. Reads only: any store folder (one computed elsewhere) can be listed."""
    wait_pending()
    rows = []
    base = Path(root)
    names = [p.name for p in base.iterdir() if is_run_id(p.name)] if base.is_dir() else []
    for folder in [base / n for n in sorted(names, key=sort_key, reverse=True)]:
        if not exists(base, folder.name):
            continue
        try:
            run = load(base, folder.name, confidences=False)
        except (OSError, ValueError, KeyError):
            continue
        rows.append(run_row(run, when_text(run.run_id)))
    names = run_names(base)
    for row in rows:
        row["name"] = names.get(row["id"], "")
    return pd.DataFrame(rows, columns=LIST_COLUMNS)


NAMES = ".names.json"
"""The store's file of run names (``{run id: name}``), beside the run folders: a bundle stays
exactly what the export wrote."""
MAX_NAME = 80
"""Longest run name kept (characters)."""


def clean_name(text: str) -> str:
    """A run name as kept: NFC, control and invisible characters dropped, spaces collapsed, at
    most :data:`MAX_NAME` characters."""
    text = unicodedata.normalize("NFC", str(text))
    text = "".join(
        " " if c.isspace() else c for c in text if c.isspace() or unicodedata.category(c)[0] != "C"
    )
    return " ".join(text.split())[:MAX_NAME]


def run_names(root: Path | str) -> dict[str, str]:
    """``{run id: name}`` of a store (empty when none are named or the file is unreadable)."""
    path = Path(root) / NAMES
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: clean_name(v) for k, v in data.items() if is_run_id(k) and isinstance(v, str)}


def _forget_names(root: Path | str, run_ids: list[str]) -> None:
    """Drop the names of runs deleted for good (nothing to do when none was named)."""
    names = run_names(root)
    if any(r in names for r in run_ids):
        _write_names(root, {k: v for k, v in names.items() if k not in run_ids})


def _write_names(root: Path | str, names: Mapping[str, str]) -> None:
    path = Path(root) / NAMES
    tmp = path.with_name(f"{NAMES}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(names), ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(path)


def set_name(root: Path | str, run_id: str, name: str) -> str:
    """Name saved run ``run_id`` (an empty name removes it); the name as kept. The names file
    is replaced in one rename, so a crash never leaves half of it."""
    if not exists(root, run_id):
        raise FileNotFoundError(f"no saved run {run_id!r} in {root}")
    names = run_names(root)
    kept = clean_name(name)
    if kept:
        names[run_id] = kept
    else:
        names.pop(run_id, None)
    _write_names(root, names)
    return kept


def label(run: StoredRun) -> str:
    """A short name of a run: its id and model."""
    return f"{run.run_id} · {run.config.model_entry}"
