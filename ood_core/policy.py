"""Which model and data sources the dashboard may use, depending on where it is served.

On a loopback address (the default, ``127.0.0.1``) the person using the dashboard is on this
machine: every source is available (other repositories still need explicit trust, see
:mod:`ood_core.hub`). Served on a network (``server.address`` not loopback, or unset, which
makes Streamlit listen on every interface), the sources that run code or read this machine's
files are off unless the operator enables them:

* ``OOD_LENS_ALLOW`` — comma-separated list among ``github`` (torch.hub GitHub repositories),
  ``local_hub`` (local hub directories) and ``local_files`` (local data files and folders);
* ``OOD_LENS_DATA_ROOTS`` — folders (separated by ``:``, ``;`` on Windows) under which local data
  files and hub directories must lie; symlinks and ``..`` are resolved before the check.

Every file a data loader reads goes through :func:`read_data_file` (or :func:`check_data_file`
first): not only the file or folder named, but each image of a folder and each file an image row
of a parquet references by path are resolved, confined to the roots, and must be regular files
(a FIFO or a device would block or never end).

The bundled models and datasets and Hugging Face dataset ids are always available.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ALLOW_ENV = "OOD_LENS_ALLOW"
ROOTS_ENV = "OOD_LENS_DATA_ROOTS"
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
SOURCE_KINDS = {
    "github": "GitHub torch.hub repositories",
    "local_hub": "local hub directories",
    "local_files": "local data files and folders",
}


class SourceNotAllowedError(ValueError):
    """A source is off in network mode, or a local path lies outside the data roots."""


def is_loopback(address: str | None) -> bool:
    """Whether a server bound to ``address`` is reachable only from this machine.

    ``None`` or ``""`` (Streamlit's default) means every interface, so it is not loopback.
    """
    if not address:
        return False
    host = address.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume it is reachable from outside


def confine_path(path: str | Path, roots: Iterable[str | Path]) -> Path:
    """``path`` resolved (``~``, ``..``, symlinks), if it lies inside one of ``roots``; else
    :class:`SourceNotAllowedError`. With no roots, every path is refused."""
    roots = [Path(r).expanduser().resolve() for r in roots]
    resolved = Path(path).expanduser().resolve()
    if not roots:
        raise SourceNotAllowedError(
            f"Local path '{path}' refused: no data roots are configured. The server's operator "
            f"can list the allowed folders in {ROOTS_ENV} (e.g. {ROOTS_ENV}=/srv/data)."
        )
    if not any(resolved.is_relative_to(root) for root in roots):
        shown = os.pathsep.join(str(r) for r in roots)
        raise SourceNotAllowedError(
            f"Local path '{path}' refused: it resolves to {resolved}, outside the allowed data "
            f"roots ({shown}). Use a file or folder under one of them."
        )
    return resolved


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(path: str | Path, resolved: Path, mode: int) -> Exception:
    from ood_core.data import DataUnavailableError

    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    via = "" if Path(path) == resolved else f" (it resolves to {resolved})"
    return DataUnavailableError(
        f"'{path}' is {kind}{via}, not a regular file: data loaders read regular files only. "
        "Point to (or copy the data into) a regular file."
    )


def _too_big(path: str | Path, size: int, max_bytes: int) -> Exception:
    from ood_core.data import DataUnavailableError

    return DataUnavailableError(
        f"'{path}' is {size / 1e9:.3g} GB, above the {max_bytes / 1e9:.3g} GB a data file may "
        "have (ood_core.data.MAX_BYTES): split it, or raise that limit."
    )


def check_data_file(
    path: str | Path,
    roots: Iterable[str | Path] | None = None,
    *,
    base: str | Path | None = None,
    max_bytes: int | None = None,
) -> tuple[Path, os.stat_result]:
    """Check a file a data loader is about to open, without opening it: ``path`` resolved
    (``~``, ``..``, symlinks; relative paths against ``base`` when given), inside one of
    ``roots`` when they are given (:func:`confine_path`), an existing regular file (not a FIFO,
    device, socket or folder) of at most ``max_bytes``. Returns the resolved path and its stat.

    Raises :class:`SourceNotAllowedError` outside the roots, else
    :class:`ood_core.data.DataUnavailableError` naming the file and the fix."""
    from ood_core.data import DataUnavailableError

    p = Path(path).expanduser()
    if base is not None and not p.is_absolute():
        p = Path(base) / p
    resolved = confine_path(p, roots) if roots is not None else p.resolve()
    try:
        st = os.stat(resolved)
    except FileNotFoundError:
        raise DataUnavailableError(f"No such file: {path}.") from None
    except OSError as exc:
        raise DataUnavailableError(f"Cannot read '{path}': {exc.strerror or exc}.") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, resolved, st.st_mode)
    if max_bytes is not None and st.st_size > max_bytes:
        raise _too_big(path, st.st_size, max_bytes)
    return resolved, st


def read_data_file(
    path: str | Path,
    roots: Iterable[str | Path] | None = None,
    *,
    base: str | Path | None = None,
    max_bytes: int | None = None,
) -> tuple[Path, bytes]:
    """The bytes of a file a data loader reads, after :func:`check_data_file` (same arguments);
    the only way loaders open files. The file is opened without following a last-moment symlink
    and without blocking, and checked again once open (a file swapped for a FIFO is refused)."""
    resolved, _ = check_data_file(path, roots, base=base, max_bytes=max_bytes)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    flags |= getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(resolved, flags)
    except OSError as exc:
        from ood_core.data import DataUnavailableError

        raise DataUnavailableError(f"Cannot read '{path}': {exc.strerror or exc}.") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, resolved, st.st_mode)
        raw = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
    if max_bytes is not None and len(raw) > max_bytes:
        raise _too_big(path, max(len(raw), st.st_size), max_bytes)
    return resolved, raw


def _parse_allow(text: str) -> frozenset[str]:
    names = [n.strip().lower() for n in text.replace(" ", ",").split(",") if n.strip()]
    for name in names:
        if name not in SOURCE_KINDS:
            close = difflib.get_close_matches(name, list(SOURCE_KINDS), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(
                f"{ALLOW_ENV}={text!r}: unknown source '{name}'; expected a comma-separated "
                f"list among {', '.join(SOURCE_KINDS)}.{hint}"
            )
    return frozenset(names)


def _parse_roots(text: str) -> tuple[str, ...]:
    roots = []
    for part in (p.strip() for p in text.split(os.pathsep)):
        if not part:
            continue
        root = Path(part).expanduser().resolve()
        if not root.is_dir():
            raise ValueError(
                f"{ROOTS_ENV}: '{part}' is not an existing folder; list existing "
                f"folders separated by '{os.pathsep}'."
            )
        roots.append(str(root))
    return tuple(roots)


@dataclass(frozen=True)
class SourcePolicy:
    """The sources a dashboard session may use. The default allows everything (loopback)."""

    served_on_network: bool = False
    allow: frozenset[str] = frozenset()
    data_roots: tuple[str, ...] = ()

    @classmethod
    def from_env(
        cls, server_address: str | None, environ: Mapping[str, str] | None = None
    ) -> SourcePolicy:
        """The policy for a server bound to ``server_address``, from ``OOD_LENS_ALLOW`` and
        ``OOD_LENS_DATA_ROOTS`` (``ValueError`` naming the variable when they are malformed)."""
        env = os.environ if environ is None else environ
        if is_loopback(server_address):
            return cls()
        return cls(True, _parse_allow(env.get(ALLOW_ENV, "")), _parse_roots(env.get(ROOTS_ENV, "")))

    def refusal(self, kind: str) -> str | None:
        """Why source ``kind`` (a key of ``SOURCE_KINDS``) is off, or None when it is on."""
        if not self.served_on_network or kind in self.allow:
            return None
        return (
            f"The dashboard is served on a network, so {SOURCE_KINDS[kind]} are off (they "
            "run code or read files on the server). The server's operator can enable them "
            f"with {ALLOW_ENV}={kind}"
            + ("" if kind == "github" else f" and {ROOTS_ENV}")
            + "; see the README's Safety section."
        )

    def load_roots(self) -> tuple[str, ...] | None:
        """Roots that local paths must lie under, or None when paths are not confined."""
        return self.data_roots if self.served_on_network else None

    def _require(self, kind: str) -> None:
        msg = self.refusal(kind)
        if msg:
            raise SourceNotAllowedError(msg)

    def check_model_repo(self, repo: str) -> None:
        """Raise :class:`SourceNotAllowedError` if the hub reference ``repo`` is off here."""
        from ood_core.hub import repo_kind

        if not self.served_on_network:
            return
        kind = repo_kind(repo)
        if kind == "github":
            self._require("github")
        elif kind == "local":
            self._require("local_hub")
            confine_path(repo, self.data_roots)

    def check_data_source(self, source: str) -> None:
        """Raise :class:`SourceNotAllowedError` if the dataset ``source`` (see
        :func:`ood_core.data.load`) is a local path that is off or outside the data roots, or
        (network mode) neither a bundled name, a local path nor a plain ``owner/name`` id."""
        from ood_core.data import BUNDLED, is_local_source

        if not self.served_on_network or source in BUNDLED:
            return
        if is_local_source(source):
            self._require("local_files")
            confine_path(source, self.data_roots)
        elif "/" in source and (not _HF_ID.fullmatch(source) or ".." in source):
            raise SourceNotAllowedError(
                f"Dataset '{source}' refused: on a network-served dashboard a Hugging Face id "
                "must be written 'owner/name' (letters, digits, '-', '_', '.')."
            )

    def describe(self) -> str | None:
        """One line for the page in network mode (None on loopback)."""
        if not self.served_on_network:
            return None
        on = [SOURCE_KINDS[k] for k in SOURCE_KINDS if k in self.allow]
        roots = (
            f"; local paths must lie under {', '.join(self.data_roots)}" if self.data_roots else ""
        )
        return (
            "Served on a network: "
            + (
                "enabled: " + ", ".join(on)
                if on
                else "only bundled models, bundled data and Hugging Face datasets"
            )
            + roots
            + "."
        )
