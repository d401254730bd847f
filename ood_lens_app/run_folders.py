"""Runs computed elsewhere: a run store folder or an exported bundle folder (the ``--out``
folder of ``ood-lens run``) opened by path on the Runs page, read-only.

No Streamlit here. A path typed into the dashboard reads files on the server, so it is checked
like a local data source (:func:`check_folder`: in network mode only when the operator enabled
``local_files``, and confined to ``OOD_LENS_DATA_ROOTS``, links and ``..`` resolved first). What
the folder holds is checked like every bundle (:func:`ood_core.bundle.read_bundle`), and a run
whose model repository is not bundled still opens only once its trust box is ticked
(:func:`ood_lens_app.runs.restore_run` / :func:`~ood_lens_app.runs.open_bundle`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from ood_core.bundle import FILES, read_bundle
from ood_core.policy import SourceNotAllowedError, SourcePolicy, confine_path
from ood_lens_app import run_store


class FolderError(ValueError):
    """A folder that cannot be opened as runs: the message says why and what to give."""


@dataclass(frozen=True)
class RunFolder:
    """A folder of runs computed elsewhere: ``kind`` ``"store"`` (a run store: one folder per
    run id) or ``"bundle"`` (one exported bundle)."""

    path: Path
    kind: Literal["store", "bundle"]
    confined: bool = False
    """Opened on a network-served dashboard: every file read must resolve inside ``path``
    (a link leaving the folder is refused, :func:`inside`)."""


def inside(folder: Path, root: Path) -> bool:
    """Whether ``folder`` and each bundle file in it resolve (links followed) inside ``root``."""
    root = root.resolve()
    paths = [folder, *(folder / name for name in (*FILES, "report.html"))]
    return all(p.resolve().is_relative_to(root) for p in paths)


def check_folder(text: str, policy: SourcePolicy) -> RunFolder:
    """The folder ``text`` names, once ``policy`` allows reading it (network mode: the
    ``local_files`` source enabled, the path under the data roots), and what it holds: a bundle
    (it has a run.json) or a run store (it has saved runs). :class:`FolderError` otherwise
    (:class:`~ood_core.policy.SourceNotAllowedError`, a ``ValueError`` too, when refused)."""
    text = (text or "").strip()
    if not text:
        raise FolderError("Give the path of a run store folder or of an exported bundle folder.")
    if policy.served_on_network:
        refusal = policy.refusal("local_files")
        if refusal:
            raise SourceNotAllowedError(refusal)
        path = confine_path(text, policy.data_roots)
    else:
        path = Path(text).expanduser().resolve()
    if not path.is_dir():
        raise FolderError(
            f"{text}: no such folder (give a run store or an exported bundle folder)."
        )
    confined = policy.served_on_network
    if (path / "run.json").is_file():
        if confined and not inside(path, path):
            raise SourceNotAllowedError(f"{text}: its files link outside the folder; refused.")
        return RunFolder(path, "bundle", confined)
    try:
        has_runs = any(run_store.exists(path, p.name) for p in path.iterdir())
    except OSError as exc:
        raise FolderError(f"{text}: cannot be read ({exc}).") from None
    if not has_runs:
        raise FolderError(
            f"{text}: neither an exported bundle (no run.json) nor a run store (no saved runs "
            "in folders named by run id)."
        )
    return RunFolder(path, "store", confined)


def bundle_id(folder: Path, run_id: object) -> str:
    """The id a bundle is listed under: its recorded run id, else its folder's name."""
    return run_id if isinstance(run_id, str) and run_id else folder.name


def load_bundle(folder: str | Path, confidences: bool = True) -> run_store.StoredRun:
    """The exported bundle in ``folder`` as a stored run (its id: :func:`bundle_id`);
    ``FileNotFoundError`` / :class:`ood_core.bundle.BundleError` as :func:`read_bundle`."""
    folder = Path(folder)
    bundle = read_bundle(folder, confidences=confidences)
    run_id = bundle_id(folder, (bundle.info.get("execution") or {}).get("run_id"))
    return run_store.StoredRun(run_id, bundle)


def list_folder(folder: RunFolder) -> pd.DataFrame:
    """The runs of ``folder`` as :func:`ood_lens_app.run_store.list_runs` lists a store (a
    bundle: its one row, ``when`` the time it was written)."""
    if folder.kind == "store":
        table = run_store.list_runs(folder.path)
        if folder.confined:  # a run folder linking out of the store is never shown
            keep = [inside(folder.path / run_id, folder.path) for run_id in table["id"]]
            table = table[keep].reset_index(drop=True)
        return table
    run = load_bundle(folder.path, confidences=False)
    when = str(run.info.get("written_at") or "")
    if run_store.is_run_id(run.run_id) and not when:
        when = run_store.when_text(run.run_id)
    return pd.DataFrame([run_store.run_row(run, when)], columns=run_store.LIST_COLUMNS)


def load_run(folder: RunFolder, run_id: str) -> run_store.StoredRun:
    """Run ``run_id`` of ``folder`` (a bundle: its one run)."""
    if folder.kind == "bundle":
        return load_bundle(folder.path)
    if (
        folder.confined
        and run_store.is_run_id(run_id)
        and not inside(folder.path / run_id, folder.path)
    ):
        raise SourceNotAllowedError(f"Saved run {run_id} links outside {folder.path}; refused.")
    return run_store.load(folder.path, run_id)
