"""Safe output folders: never overwrite without asking, never leave a half-written folder.

:func:`check_out_dir` says, before any computation and in milliseconds (standard library only),
whether a folder can receive results: it refuses an empty path, a file, a path under a file, a
symbolic link, an unwritable place, an existing non-empty folder (unless ``force``) and a folder
that holds a protected file (the input config).

``force`` replaces only a folder that is provably an earlier ood-lens bundle
(:func:`bundle_problems`): its ``run.json`` parses and its ``files`` table lists exactly the
other entries present, each a regular file (no link, folder or extra file, hidden ones
included) of the size recorded. Anything else is refused, saying what was found, and nothing is
touched. :func:`write_atomic` writes the files into a new hidden sibling folder, files opened
with ``O_EXCL | O_NOFOLLOW`` (never through a link), and renames it into place at the end; with
``force`` the old folder is moved aside only once the new one is complete, checked again, and
then only the files its ``run.json`` lists are deleted (a file that appeared meanwhile is kept).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

BUNDLE_FILES = frozenset(
    {"metrics.csv", "confidences.parquet", "report.html", "config.toml", "run.json"}
)
"""The names ood-lens writes in an output folder (``--force`` replaces only such folders)."""
MANIFEST = "run.json"
"""The bundle's completion marker, written last; its ``files`` table lists the other files."""
_MANIFEST_MAX_BYTES = 256 * 2**20


class OutputDirError(ValueError):
    """The output folder cannot receive results; the message says why and what to do."""


def _abs(path: str | os.PathLike[str]) -> Path:
    """Absolute, lexically normalised path; symbolic links are NOT resolved."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _inside(path: Path, folder: Path) -> bool:
    real, top = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return real == top or top in real.parents


def check_out_dir(
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    protect: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """The absolute output folder, or :class:`OutputDirError` saying why it cannot be used.

    ``protect``: files that must never be touched (the input config): a folder holding one is
    refused, with or without ``force``.
    """
    if not os.fspath(out_dir).strip():
        raise OutputDirError("--out is empty; name a folder for the results (e.g. --out results/).")
    out = _abs(out_dir)
    if out == Path(out.anchor):
        raise OutputDirError(
            f"--out {out} is the filesystem root; choose a folder for the results."
        )
    if os.path.islink(out):
        raise OutputDirError(
            f"--out {out} is a symbolic link (to {os.path.realpath(out)}); ood-lens never writes "
            "through links: pass a real folder path."
        )
    ancestor = out.parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputDirError(
            f"--out {out} lies under {ancestor}, which is a file, not a folder; choose another path."
        )
    if os.path.lexists(out):
        if not out.is_dir():
            raise OutputDirError(
                f"--out {out} is an existing file, not a folder; choose a folder path."
            )
        try:
            entries = sorted(os.listdir(out))
        except OSError as exc:
            raise OutputDirError(f"--out {out} cannot be read ({exc.strerror}).") from None
        for p in protect:
            if _inside(_abs(p), out):
                raise OutputDirError(
                    f"The config file {p} lies inside the output folder {out}; ood-lens never "
                    "touches its input: choose another --out (or move the config)."
                )
        if entries and not force:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise OutputDirError(
                f"--out {out} already exists and is not empty ({shown}); pass --force to replace "
                "it with the new results (the old folder is removed only once they are complete), "
                "or choose another folder."
            )
        problems = bundle_problems(out, entries) if entries else []
        if problems:
            raise OutputDirError(
                f"--out {out} is not an earlier ood-lens bundle: " + "; ".join(problems) + ". "
                "--force replaces only a folder ood-lens wrote (its run.json lists exactly the "
                "files present); nothing was touched: choose another folder, or move away what "
                "is not ood-lens's."
            )
    probe = ancestor / f".ood-lens-probe-{secrets.token_hex(4)}"
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as exc:
        raise OutputDirError(
            f"--out {out}: cannot create files in {ancestor} ({exc.strerror}); choose a writable "
            "folder."
        ) from None
    return out


def _names(items: list[str], limit: int = 4) -> str:
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def _manifest(folder: Path) -> tuple[dict[str, int | None] | None, str | None]:
    """``{name: recorded size or None}`` from ``folder/run.json``'s ``files`` table, or None and
    what is wrong with it."""
    path = folder / MANIFEST
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, "it has no run.json"
    except OSError as exc:
        return None, f"its run.json cannot be read ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return None, f"its run.json is {_kind(st.st_mode)}"
    if st.st_size > _MANIFEST_MAX_BYTES:
        return None, f"its run.json is too large to be ood-lens's ({st.st_size} bytes)"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            info = json.loads(f.read().decode("utf-8"))
    except OSError as exc:
        return None, f"its run.json cannot be read ({exc.strerror})"
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        return None, f"its run.json does not parse ({exc})"
    files = info.get("files") if isinstance(info, dict) else None
    if isinstance(files, list) and all(isinstance(n, str) for n in files):
        files = {n: None for n in files}
    if not isinstance(files, dict) or not all(isinstance(n, str) for n in files):
        return None, 'its run.json has no table of the files it wrote ("files")'
    listed: dict[str, int | None] = {}
    for name, meta in files.items():
        size = meta.get("bytes") if isinstance(meta, dict) else None
        listed[name] = size if isinstance(size, int) and not isinstance(size, bool) else None
    return listed, None


def bundle_problems(
    folder: str | os.PathLike[str], entries: Sequence[str] | None = None
) -> list[str]:
    """Why ``folder`` is not provably an earlier ood-lens bundle (empty list: it is one, and
    ``--force`` may replace it). ``entries``: its listing, when already read.

    A bundle: ``run.json`` parses, its ``files`` table names only files ood-lens writes
    (:data:`BUNDLE_FILES`), and the folder holds exactly those plus ``run.json``, every one a
    regular file (never a link or a folder) of the size recorded. Milliseconds: sizes are
    compared, files are not hashed."""
    folder = _abs(folder)
    entries = sorted(os.listdir(folder)) if entries is None else sorted(entries)
    problems: list[str] = []
    foreign = [e for e in entries if e not in BUNDLE_FILES]
    if foreign:
        problems.append(f"it holds files ood-lens does not write ({_names(foreign)})")
    sizes: dict[str, int] = {}
    for name in entries:
        if name in foreign:
            continue
        try:
            st = os.lstat(folder / name)
        except OSError as exc:
            problems.append(f"{name} cannot be read ({exc.strerror})")
            continue
        if stat.S_ISREG(st.st_mode):
            sizes[name] = st.st_size
        elif name != MANIFEST:
            problems.append(f"{name} is {_kind(st.st_mode)}, not a file ood-lens wrote")
    listed, why = _manifest(folder)
    if listed is None:
        problems.append(str(why))
        return problems
    listed.pop(MANIFEST, None)  # a table naming run.json itself is harmless
    not_ours = sorted(n for n in listed if n not in BUNDLE_FILES)
    if not_ours:
        problems.append(f"its run.json lists files ood-lens does not write ({_names(not_ours)})")
    present = set(entries) - {MANIFEST}
    missing = sorted(set(listed) - present - set(not_ours))
    if missing:
        problems.append(f"its run.json lists {_names(missing)}, not present")
    unlisted = sorted(present - set(listed) - set(foreign))
    if unlisted:
        problems.append(f"{_names(unlisted)} not listed in its run.json")
    for name, size in sorted(listed.items()):
        if name in sizes and size is not None and sizes[name] != size:
            problems.append(
                f"{name} was changed since ood-lens wrote it ({sizes[name]} bytes, run.json "
                f"says {size})"
            )
    return problems


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (must not exist; a link there is never followed) and write ``data``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags | getattr(os, "O_BINARY", 0), 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_atomic(
    out_dir: str | os.PathLike[str],
    files: Iterable[tuple[str, bytes]],
    *,
    force: bool = False,
    protect: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Write ``(name, bytes)`` pairs (in order: put the completion marker last) into a new
    folder, then rename it to ``out_dir``; return ``out_dir`` as an absolute path.

    Any exception (``KeyboardInterrupt`` included) removes the new folder and leaves
    ``out_dir`` as it was. See :func:`check_out_dir` for what is refused.
    """
    out = check_out_dir(out_dir, force=force, protect=protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    os.mkdir(tmp)
    try:
        for name, data in files:
            if name != os.path.basename(name) or name in ("", ".", ".."):
                raise ValueError(f"not a plain file name: {name!r}")
            _write_new(tmp / name, data)
        _swap_into_place(tmp, out, force=force, protect=protect)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_into_place(
    tmp: Path, out: Path, *, force: bool, protect: Sequence[str | os.PathLike[str]]
) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and deleted after."""
    if not os.path.lexists(out):
        os.rename(tmp, out)  # fails (never writes through) if a link or file appeared meanwhile
        return
    check_out_dir(out, force=force, protect=protect)  # again: it may have changed meanwhile
    backup = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    try:
        os.rename(out, backup)
        left = os.listdir(backup)
        if left and (not force or bundle_problems(backup, left)):  # changed meanwhile
            os.rename(backup, out)
            check_out_dir(out, force=force, protect=protect)  # raises, saying what changed
            raise OutputDirError(f"--out {out} changed while the results were written.")
        os.rename(tmp, out)
    except BaseException:
        if os.path.lexists(backup) and not os.path.lexists(out):
            os.rename(backup, out)
        raise
    _remove_bundle(backup)


def _remove_bundle(folder: Path) -> None:
    """Delete the files of the old bundle ``folder`` (its regular files with ood-lens names,
    never following a link), then the folder; anything else that appeared in it meanwhile is
    left where it is (the folder then stays, hidden, beside the new results)."""
    for name in os.listdir(folder):
        path = folder / name
        if name in BUNDLE_FILES and stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(folder)
