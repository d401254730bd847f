"""Pre-flight memory estimates: refuse, with the number, what cannot fit before computing it.

Work whose memory grows with a parameter (``Odds(noise_samples)``, JTLA's class histograms,
neighbour searches with a large ``k``...) or with a layer's size is estimated before it starts;
when the estimate exceeds the memory available, :func:`check_budget` raises
:class:`BudgetError` (a ``ValueError``) naming the computation, the estimate in GB, the limit
and the remedy, e.g. ``"Odds: ... needs ~31 GB of memory but 24.3 GB are available
(MemAvailable ...); lower noise_samples or batch_size."``, instead of the process being killed
by the kernel (or CUDA running out of memory) half-way with no message.

The limit is the memory available when the check runs: ``MemAvailable`` from ``/proc/meminfo``
(capped by the cgroup v2 limit of a container, when there is one), else
``os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_AVPHYS_PAGES')``; on a CUDA device, its free
memory. The environment variable ``OOD_LENS_MEMORY_LIMIT`` overrides it for every device: a
size such as ``8GB``, ``512MiB``, ``2e9`` (bytes), or ``off`` to disable the checks.

Estimates are deliberately simple (the dominant tensors, with a small factor for temporaries):
they are meant to tell "fits" from "cannot possibly fit", not to predict the peak to the byte.

Reading an estimate without computing: inside :func:`estimating`, :func:`check_budget` records
each estimate as a :class:`Need` instead of checking it. A score's pre-flight checks
(``check_calibration``) are its estimates: :meth:`ood_core.scores.base.BaseScore.
resource_estimates` runs them on a bound copy of the score under :func:`estimating`, so what a
UI shows beside a score is exactly what the fit will check.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ENV_VAR = "OOD_LENS_MEMORY_LIMIT"
"""Environment variable overriding the memory limit (e.g. ``8GB``; ``off``: no check)."""

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "kib": 2**10,
    "m": 1e6,
    "mb": 1e6,
    "mib": 2**20,
    "g": 1e9,
    "gb": 1e9,
    "gib": 2**30,
    "t": 1e12,
    "tb": 1e12,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_OFF = ("off", "none", "inf", "unlimited", "no")


class BudgetError(ValueError):
    """A computation would need more memory than is available (see :func:`check_budget`)."""


@dataclass(frozen=True)
class Need:
    """One pre-flight estimate, as :func:`check_budget` receives it: ``what`` needs ``n_bytes``
    on ``device`` (None: the host); ``remedy`` says how to need less."""

    what: str
    n_bytes: float
    remedy: str
    device: str | None = None

    def check(self) -> None:
        """:func:`check_budget` of this estimate."""
        check_budget(self.what, self.n_bytes, self.remedy, self.device)


@dataclass
class Estimates:
    """What :func:`estimating` collected: every :class:`Need` and the warnings (``notes``,
    e.g. a covariance that will take minutes) the checks raised."""

    needs: list[Need] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> Need | None:
        """The largest need (None when nothing was estimated)."""
        return max(self.needs, key=lambda n: n.n_bytes, default=None)

    def over_limit(self) -> list[Need]:
        """The needs beyond :func:`memory_limit` of their device (those a fit would refuse)."""
        return [n for n in self.needs if n.n_bytes > memory_limit(n.device)[0]]


_COLLECTING: ContextVar[Estimates | None] = ContextVar("ood_lens_estimating", default=None)


@contextmanager
def estimating() -> Iterator[Estimates]:
    """Inside the block, :func:`check_budget` records each estimate into the yielded
    :class:`Estimates` instead of checking it (per thread / context: concurrent dashboard
    sessions do not see each other's)."""
    collected = Estimates()
    token = _COLLECTING.set(collected)
    try:
        yield collected
    finally:
        _COLLECTING.reset(token)


def parse_size(text: str) -> float:
    """Bytes of a size such as ``'8GB'``, ``'512 MiB'``, ``'2e9'`` (``inf`` for ``'off'``);
    ValueError naming :data:`ENV_VAR` otherwise."""
    if text.strip().lower() in _OFF:
        return math.inf
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"{ENV_VAR}={text!r} is not a memory size; use e.g. '8GB', '512MiB', '2e9' "
            "(bytes) or 'off'."
        )
    return float(match.group(1)) * _UNITS[unit]


def _cgroup_room() -> float:
    """Bytes the cgroup v2 limit still allows (``inf`` without a limit)."""
    try:
        root = Path("/sys/fs/cgroup")
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return math.inf
        return max(0.0, float(limit) - float((root / "memory.current").read_text()))
    except (OSError, ValueError):
        return math.inf


def available_memory() -> tuple[float, str]:
    """``(bytes, source)``: the host memory available now (``inf`` when it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = float(line.split()[1]) * 1024
                room = _cgroup_room()
                if room < free:
                    return room, "the container's memory limit"
                return free, "MemAvailable"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")), "free pages"
    except (AttributeError, OSError, ValueError):
        return math.inf, "unknown"


def memory_limit(device: torch.device | str | None = None) -> tuple[float, str]:
    """``(bytes, source)`` of the memory a computation on ``device`` may use:
    :data:`ENV_VAR` when set, else the free memory of a CUDA ``device``, else
    :func:`available_memory`."""
    text = os.environ.get(ENV_VAR, "").strip()
    if text:
        return parse_size(text), ENV_VAR
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return float(free), f"free memory of {dev}"
    return available_memory()


def fmt_gb(n_bytes: float) -> str:
    """``n_bytes`` in GB (10^9 bytes) with 2-3 significant digits, e.g. ``'31 GB'``."""
    gb = n_bytes / 1e9
    if gb >= 100:
        return f"{gb:,.0f} GB"
    return f"{gb:.2g} GB" if gb < 1 else f"{gb:.3g} GB"


def check_budget(
    what: str, n_bytes: float, remedy: str, device: torch.device | str | None = None
) -> None:
    """Raise :class:`BudgetError` when ``what`` (e.g. ``"Odds: the noisy forward passes"``)
    would need ``n_bytes`` (an estimate) beyond :func:`memory_limit` of ``device``; the message
    gives both in GB and ``remedy`` (e.g. ``"lower noise_samples or batch_size"``). Inside
    :func:`estimating` it only records the estimate."""
    collected = _COLLECTING.get()
    if collected is not None:
        dev = None if device is None else str(device)
        collected.needs.append(Need(what, float(n_bytes), remedy, dev))
        return
    limit, source = memory_limit(device)
    if n_bytes <= limit:
        return
    hint = "" if source == ENV_VAR else f"; {ENV_VAR} overrides the limit"
    raise BudgetError(
        f"{what} needs ~{fmt_gb(n_bytes)} of memory but {fmt_gb(limit)} are available "
        f"({source}{hint}); {remedy}."
    )


def check_disk(what: str, n_bytes: float, remedy: str, folder: str | Path) -> None:
    """Raise :class:`BudgetError` when ``what`` would write ``n_bytes`` (an estimate) to
    ``folder`` beyond its free space (nothing is checked inside :func:`estimating`, which
    collects memory needs only)."""
    if _COLLECTING.get() is not None:
        return
    free = shutil.disk_usage(folder).free
    if n_bytes <= free:
        return
    raise BudgetError(
        f"{what} needs ~{fmt_gb(n_bytes)} of disk in {folder} but {fmt_gb(free)} are free; "
        f"{remedy}, or point TMPDIR at a disk with room."
    )


def numel(size: Any) -> int:
    """Number of values of a shape (nested shapes, e.g. of tuple outputs, summed)."""
    if isinstance(size, Iterable) and not isinstance(size, str):
        items = list(size)
        if all(isinstance(s, int) for s in items):
            return math.prod(items)
        return sum(numel(s) for s in items)
    return int(size) if isinstance(size, int) else 0


def per_sample_numel(output_size: Any) -> int:
    """Values per sample of a layer-table ``output_size`` (batch dimension first; the shapes of
    a tuple output summed)."""
    items = list(output_size or ())
    if all(isinstance(s, int) for s in items):
        return math.prod(items[1:]) if items else 0
    return sum(per_sample_numel(s) for s in items)


def net_device_dtype(net: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the network's first parameter (or buffer; else CPU float32)."""
    t = next(net.parameters(), None)
    if t is None:
        t = next(net.buffers(), None)
    return (t.device, t.dtype) if t is not None else (torch.device("cpu"), torch.float32)


def forward_bytes_per_sample(recorder: Any, itemsize: int | None = None) -> int:
    """Estimated peak bytes per input row of a gradient-free forward pass of the recorder's
    network: ``itemsize * (4 * largest layer output + 2 * input)`` values (the largest
    activation, its neighbours and temporaries; within ~20% of the measured peak of the
    bundled models)."""
    if itemsize is None:
        itemsize = net_device_dtype(recorder.net)[1].itemsize
    largest = max(
        (per_sample_numel(recorder.info(lid).output_size) for lid in recorder.layer_ids[1:]),
        default=0,
    )
    return itemsize * (4 * largest + 2 * numel(recorder.input_shape))


__all__ = [
    "ENV_VAR",
    "BudgetError",
    "Estimates",
    "Need",
    "available_memory",
    "check_budget",
    "estimating",
    "fmt_gb",
    "forward_bytes_per_sample",
    "memory_limit",
    "net_device_dtype",
    "numel",
    "parse_size",
    "per_sample_numel",
]
