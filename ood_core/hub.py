"""Models from torch.hub repositories: the bundled local repo, any local hub dir, GitHub repos.

A *hub reference* is one of
* ``"bundled"`` — the repository shipped in ``assets/hub`` (offline);
* a local directory holding a ``hubconf.py``;
* a GitHub repository ``"owner/repo[:ref]"`` loaded through ``torch.hub.load`` (network needed,
  unless it is already in the torch.hub cache).

Only the bundled repository is trusted implicitly. Any other repository (a local hub directory,
a GitHub repository, cached or not) runs its ``hubconf.py`` and model code on this machine, so
:func:`load_model` and :func:`list_entries` refuse it with :class:`UntrustedRepoError` unless
called with ``trust_repo=True``. Trust comes only from the person at the keyboard: the CLI's
``--trust-repo``, the dashboard's trust checkbox, ``trust_repo=True`` in Python; never from a
file (a config's or bundle's ``trust_repo = true`` is only a request, see
:attr:`ood_core.config.RunConfig.trust_requested`).

A model may carry an ``ood_lens`` dict attribute declaring ``input_shape`` ``(C, H, W)``,
``class_names``, ``normalisation`` and ``test_accuracy``; :func:`model_info` reads it.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ood_core.core import (
    OutputError,
    exclusive_eval,
    logits_problem,
    output_key,
    select,
    viewed_net,
)
from ood_core.data import network_available

BUNDLED_HUB = Path(__file__).resolve().parents[1] / "assets" / "hub"


class HubUnavailableError(RuntimeError):
    """A hub model could not be listed or loaded (no network, unknown entry point, bad repo)."""


class UntrustedRepoError(HubUnavailableError):
    """A repository other than the bundled one was used without ``trust_repo=True``."""

    def __init__(self, repo: str) -> None:
        self.repo = repo
        super().__init__(
            f"Refusing to use the torch.hub repository '{repo}' without your trust: loading it "
            "runs its hubconf.py and model code on this machine, with your permissions. If you "
            "trust it, pass --trust-repo to ood-lens on the command line (trust_repo = true in "
            "a config file or bundle is only a request: a file never grants trust), tick the "
            "trust box in the dashboard, or call load_model(..., trust_repo=True) in Python. "
            "Only the bundled models are trusted without asking."
        )


@dataclass
class ModelInfo:
    """What a model declares about its inputs (fields are None when it declares nothing)."""

    name: str
    input_shape: tuple[int, ...] | None = None
    class_names: list[str] | None = None
    normalisation: str | None = None
    test_accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def is_bundled(repo: str | Path) -> bool:
    """Whether ``repo`` names the bundled repository (``"bundled"`` or its folder)."""
    if str(repo) == "bundled":
        return True
    try:
        return Path(repo).expanduser().resolve() == BUNDLED_HUB
    except (OSError, RuntimeError, ValueError):
        return False


def require_trust(repo: str | Path, trust_repo: bool) -> None:
    """Raise :class:`UntrustedRepoError` unless ``repo`` is the bundled repository or the caller
    passed ``trust_repo=True``: checked on every use, a model loaded (and cached) for a caller
    who trusted it is never handed to one who did not."""
    if trust_repo is not True and not is_bundled(repo):
        raise UntrustedRepoError(str(repo))


def repo_kind(repo: str | Path) -> str:
    """``"bundled"``, ``"local"`` (a directory) or ``"github"`` (anything else; may be invalid)."""
    if is_bundled(repo):
        return "bundled"
    return "local" if Path(repo).expanduser().is_dir() else "github"


def _resolve(repo: str | Path, trust_repo: bool = False) -> tuple[str, str]:
    """Return ``(repo_or_dir, source)`` for ``torch.hub``; untrusted non-bundled repos raise
    :class:`UntrustedRepoError` before any of their code is imported or downloaded."""
    if is_bundled(repo):
        return str(BUNDLED_HUB), "local"
    path = Path(repo).expanduser()
    if path.is_dir():
        if not (path / "hubconf.py").exists():
            raise HubUnavailableError(f"{path} is a directory but holds no hubconf.py.")
        if not trust_repo:
            raise UntrustedRepoError(str(repo))
        return str(path), "local"
    name = str(repo)
    if name.count("/") != 1 or " " in name:
        raise HubUnavailableError(
            f"'{name}' is neither 'bundled', a local directory with a hubconf.py, nor a GitHub "
            "repository written 'owner/repo' or 'owner/repo:ref'."
        )
    if not trust_repo:
        raise UntrustedRepoError(name)
    return name, "github"


def _cached_github_dir(repo: str) -> Path | None:
    """The torch.hub cache folder of a GitHub repo, if it was downloaded before."""
    owner_name, _, ref = repo.partition(":")
    owner, name = owner_name.split("/")
    folder = Path(torch.hub.get_dir()) / f"{owner}_{name}_{(ref or 'main').replace('/', '_')}"
    return folder if (folder / "hubconf.py").exists() else None


def _github_or_cache(repo: str, timeout: float) -> tuple[str, str]:
    cached = _cached_github_dir(repo)
    if cached is not None:
        return str(cached), "local"
    if not network_available("github.com", timeout=timeout):
        raise HubUnavailableError(
            f"Cannot load the torch.hub repository '{repo}': github.com was not reachable within "
            f"{timeout:.0f} s (no network?) and the repository is not in the torch.hub cache "
            f"({torch.hub.get_dir()}). Use the bundled models or a local hub directory instead."
        )
    return repo, "github"


def _local_entries(repo_dir: str) -> dict[str, Any]:
    """Entry points of a local hub directory: the public callables of its ``hubconf.py``."""
    import importlib.util
    import sys

    path = Path(repo_dir) / "hubconf.py"
    spec = importlib.util.spec_from_file_location(f"_ood_lens_hubconf_{abs(hash(repo_dir))}", path)
    if spec is None or spec.loader is None:
        raise HubUnavailableError(f"Cannot import {path}.")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, repo_dir)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise HubUnavailableError(f"Importing {path} failed: {exc}") from exc
    finally:
        sys.path.remove(repo_dir)
    return {
        name: obj
        for name, obj in vars(module).items()
        if callable(obj)
        and not name.startswith("_")
        and inspect.isfunction(obj)
        and obj.__module__ == module.__name__
    }


# torch.hub is only called below once _resolve has accepted the repository (bundled, or trusted by
# the caller), so passing trust_repo=True to torch never grants trust by itself and never prompts.
def _entry_names(repo_or_dir: str, source: str) -> list[str]:
    if source == "local":
        return sorted(_local_entries(repo_or_dir))
    return torch.hub.list(repo_or_dir, trust_repo=True, verbose=False)


def list_entries(
    repo: str | Path = "bundled", timeout: float = 5.0, *, trust_repo: bool = False
) -> list[dict[str, str]]:
    """Entry points of a hub repository: ``[{"name", "doc"}]`` (doc = first docstring line).

    Listing imports the repository's ``hubconf.py``, so a repository other than the bundled one
    needs ``trust_repo=True`` (else :class:`UntrustedRepoError`).
    """
    repo_or_dir, source = _resolve(repo, trust_repo)
    if source == "github":
        repo_or_dir, source = _github_or_cache(repo_or_dir, timeout)
    try:
        if source == "local":
            funcs = _local_entries(repo_or_dir)
            docs = {name: f.__doc__ or "" for name, f in funcs.items()}
        else:
            docs = {
                name: torch.hub.help(repo_or_dir, name, trust_repo=True) or ""
                for name in torch.hub.list(repo_or_dir, trust_repo=True, verbose=False)
            }
    except HubUnavailableError:
        raise
    except Exception as exc:
        raise HubUnavailableError(f"Could not list the entry points of '{repo}': {exc}") from exc
    return [
        {"name": name, "doc": inspect.cleandoc(doc).split("\n")[0] if doc else ""}
        for name, doc in docs.items()
    ]


def load_model(
    repo: str | Path = "bundled",
    entry: str = "tiniest",
    *,
    trust_repo: bool = False,
    timeout: float = 5.0,
    **kwargs: Any,
) -> nn.Module:
    """Load ``entry`` from a hub repository (see module doc) in eval mode.

    A repository other than the bundled one runs its code here and needs ``trust_repo=True``
    (else :class:`UntrustedRepoError`, raised before anything is imported or downloaded).
    Offline, a GitHub repository that is not cached fails within ``timeout`` seconds with a
    :class:`HubUnavailableError` naming the repository.
    """
    repo_or_dir, source = _resolve(repo, trust_repo)
    if source == "github":
        repo_or_dir, source = _github_or_cache(repo_or_dir, timeout)
    try:
        net = torch.hub.load(
            repo_or_dir, entry, source=source, trust_repo=True, verbose=False, **kwargs
        )
    except Exception as exc:
        try:
            known = _entry_names(repo_or_dir, source)
        except Exception:
            known = []
        hint = (
            f" Available entry points: {', '.join(known)}." if known and entry not in known else ""
        )
        raise HubUnavailableError(f"Could not load '{entry}' from '{repo}': {exc}.{hint}") from exc
    if not isinstance(net, nn.Module):
        raise HubUnavailableError(
            f"'{entry}' from '{repo}' returned {type(net).__name__}, not a model."
        )
    return net.eval()


def model_info(net: nn.Module, name: str | None = None) -> ModelInfo:
    """Read what a model declares in its ``ood_lens`` attribute."""
    meta = dict(getattr(net, "ood_lens", {}) or {})
    shape = meta.pop("input_shape", None)
    return ModelInfo(
        name=name or type(net).__name__,
        input_shape=tuple(shape) if shape is not None else None,
        class_names=meta.pop("class_names", None),
        normalisation=meta.pop("normalisation", None),
        test_accuracy=meta.pop("test_accuracy", None),
        extra=meta,
    )


def bundled_records() -> dict[str, dict[str, Any]]:
    """Training records of the bundled models (accuracy, params, seed...) from ``models.json``."""
    return json.loads((BUNDLED_HUB / "models.json").read_text())


def check_compatible(
    net: nn.Module, sample_shape: tuple[int, ...], n_classes: int | None = None, name: str = "model"
) -> None:
    """Raise ``ValueError`` with an actionable message if ``net`` can't take ``sample_shape`` inputs
    (one forward pass on a zero batch), returns no logits ``(N, n_classes)`` (a tuple, dict...
    without a chosen element: the message lists what it returns and how to choose, see
    :func:`~ood_core.core.select_output`) or predicts a different number of classes."""
    info = model_info(net, name)
    if info.input_shape is not None and tuple(info.input_shape) != tuple(sample_shape):
        raise ValueError(
            f"{name} expects inputs of shape {tuple(info.input_shape)} (C, H, W) but the dataset's "
            f"images are {tuple(sample_shape)}. Pick data with matching channels and size."
        )
    param = next(net.parameters(), None)
    x = torch.zeros(
        1,
        *sample_shape,
        device=param.device if param is not None else "cpu",
        dtype=param.dtype if param is not None else torch.float32,
    )
    key = output_key(net)
    try:
        with exclusive_eval(net), torch.no_grad():
            raw = viewed_net(net)(x)
            out = raw if key is None else select(raw, key)
    except OutputError as exc:
        raise OutputError(f"{name}: {exc}") from None
    except Exception as exc:
        raise ValueError(
            f"{name} failed on inputs of shape {tuple(sample_shape)}: {exc}. Pick data with the "
            "channels and size the model was trained on."
        ) from exc
    problem = logits_problem(out, key, raw)
    if problem:
        raise OutputError(f"{name}: {problem}")
    if n_classes is not None and out.shape[1] < n_classes:
        raise ValueError(
            f"{name} predicts {out.shape[1]} classes but the dataset has {n_classes} classes."
        )
