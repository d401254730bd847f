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

The bundled models and datasets and Hugging Face dataset ids are always available.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
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
