"""Execution devices and mixed precision: resolve a device spec, check an AMP choice, and
describe the machine a run was computed on (provenance).

Device specs: ``"auto"`` (CUDA device 0 when CUDA is available, else the CPU), ``"cpu"``,
``"cuda"`` (= ``"cuda:0"``) and ``"cuda:N"``. A spec that names a device this machine does not
have is an error (:class:`DeviceError`), never a silent fall back to the CPU.

AMP choices: ``None`` (full precision), ``"bf16"`` (bfloat16 autocast; CPU, and CUDA devices that
support it) and ``"fp16"`` (float16 autocast; CUDA only). AMP changes the numbers (a bf16
confidence differs from fp32 at the 1e-2 level), so it is part of a run's identity, unlike the
executor.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import re
import sys

import torch

DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")
"""Device specs that need no index (``"cuda:N"`` is also accepted)."""
AMP_CHOICES: tuple[str, ...] = ("bf16", "fp16")
"""Mixed-precision choices; ``None`` (or ``False`` in a config) means full precision."""
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""The autocast dtype of each AMP choice."""

_CUDA_SPEC = re.compile(r"cuda(?::(\d+))?")


class DeviceError(ValueError):
    """A device spec or AMP choice this machine cannot honour (the message says why)."""


def check_device_spec(spec: str) -> str:
    """Return ``spec`` if it is well formed (``auto|cpu|cuda|cuda:N``), without looking at the
    hardware; raise :class:`DeviceError` otherwise."""
    if not isinstance(spec, str) or not (spec in ("auto", "cpu") or _CUDA_SPEC.fullmatch(spec)):
        raise DeviceError(f"unknown device {spec!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return spec


def resolve_device(spec: str = "auto") -> torch.device:
    """The :class:`torch.device` of ``spec`` on this machine.

    ``"auto"`` is ``cuda:0`` when CUDA is available, else ``cpu``; ``"cuda"`` is ``cuda:0``.
    Raises :class:`DeviceError` for an unknown spec, CUDA on a machine without it, or a CUDA
    index past the last device.
    """
    check_device_spec(spec)
    if spec == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if spec == "auto":
        return torch.device("cuda", 0) if available else torch.device("cpu")
    m = _CUDA_SPEC.fullmatch(spec)
    assert m is not None
    index = int(m.group(1) or 0)
    if not available:
        raise DeviceError(
            f"device {spec!r}: CUDA is not available on this machine (use 'auto' or 'cpu')"
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"device {spec!r}: this machine has {count} CUDA device(s), indices 0..{count - 1}"
        )
    return torch.device("cuda", index)


def available_devices() -> list[str]:
    """The device specs usable on this machine: ``auto``, ``cpu`` and one ``cuda:N`` per GPU."""
    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return out


def normalise_amp(amp: object) -> str | None:
    """``None``/``False``/``""``/``"none"`` -> ``None``; ``"bf16"``/``"fp16"`` unchanged; any other
    value raises :class:`DeviceError`."""
    if amp is None or amp is False or amp == "" or amp == "none":
        return None
    if isinstance(amp, str) and amp in AMP_CHOICES:
        return amp
    raise DeviceError(f"unknown amp {amp!r}: use false, 'bf16' or 'fp16'")


def check_amp(amp: object, device: torch.device | str) -> str | None:
    """Validate an AMP choice for ``device`` (a device or a spec) and return it normalised.

    ``fp16`` needs a CUDA device; ``bf16`` works on the CPU and on CUDA devices that support
    bfloat16. Raises :class:`DeviceError` otherwise.
    """
    amp = normalise_amp(amp)
    if amp is None:
        return None
    dev = resolve_device(device) if isinstance(device, str) else device
    if amp == "fp16" and dev.type != "cuda":
        raise DeviceError(f"amp 'fp16' needs a CUDA device, not {str(dev)!r} (use 'bf16' on CPU)")
    if amp == "bf16" and dev.type == "cuda":
        with torch.cuda.device(dev):
            if not torch.cuda.is_bf16_supported():
                raise DeviceError(f"amp 'bf16': device {str(dev)!r} does not support bfloat16")
    return amp


def device_name(device: torch.device) -> str:
    """A human name of ``device``: the GPU's name, or the CPU's processor string."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_info(device: torch.device | None = None) -> dict[str, str]:
    """What a run is computed with: python, torch, torchvision / timm / ray / ood-lens versions
    (those installed), platform, the CUDA version torch was built with and the device's name (``device`` defaults to
    the resolved ``"auto"``). All values are strings; missing packages are left out."""
    dev = device if device is not None else resolve_device("auto")
    info: dict[str, str] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    for dist in ("torchvision", "timm", "ray", "ood-lens"):
        v = _version(dist)
        if v is not None:
            info[dist] = v
    info["platform"] = platform.platform()
    if torch.version.cuda:
        info["cuda"] = str(torch.version.cuda)
    info["device_name"] = device_name(dev)
    return info


def ray_available() -> bool:
    """Whether the Ray executor can run here: the optional ``ray`` package
    (``pip install 'ood-lens[ray]'``) and :mod:`ood_core.ray_engine` are importable."""
    return (
        importlib.util.find_spec("ray") is not None
        and importlib.util.find_spec("ood_core.ray_engine") is not None
    )
