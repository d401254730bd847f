"""Safe output folders: never overwrite without asking, never leave a half-written folder.

:func:`check_out_dir` says, before any computation and in milliseconds (standard library only),
whether a folder can receive results: it refuses a file, a path under a file, a symbolic link,
an unwritable place, an existing non-empty folder (unless ``force``), a folder holding files
ood-lens does not write (even with ``force``) and a folder that holds a protected file (the
input config). :func:`write_atomic` writes the files into a new hidden sibling folder, files
opened with ``O_EXCL | O_NOFOLLOW`` (never through a link), and renames it into place at the end;
with ``force`` the old folder is moved aside only once the new one is complete, then deleted.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

BUNDLE_FILES = frozenset(
    {"metrics.csv", "confidences.parquet", "report.html", "config.toml", "run.json"}
)
"""The names ood-lens writes in an output folder (``--force`` replaces only such folders)."""


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
        foreign = [e for e in entries if e not in BUNDLE_FILES]
        if foreign:
            raise OutputDirError(
                f"--out {out} holds files ood-lens does not write ({', '.join(foreign[:4])}); "
                "refusing to replace it even with --force: choose another folder or remove them."
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
        os.rename(tmp, out)
    except BaseException:
        if os.path.lexists(backup) and not os.path.lexists(out):
            os.rename(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)  # removes links inside, never follows them
