"""Checks of the input batches every score sees, against what the model declares or was traced on.

Images are float tensors ``(N, C, H, W)``; a bundled model declares its input in its ``ood_lens``
attribute (``input_shape``, and a value range such as ``"inputs in [0, 1]"`` in ``normalisation``).
A batch that does not match is refused before any forward pass, with a message saying what was
expected, what was given and how to fix it: integer images, 0-255 floats for a [0, 1] model, the
wrong size or number of channels would otherwise be scored silently (or end in a raw torch error).
So are tensors without values (the ``meta`` device), sparse or complex tensors and infinite
values; a value out of the expected range is named with its position and all its digits.

The expected range (:func:`expected_range`): the user's ``input_range=(low, high)`` (given to
``Recorder`` / ``fit_scores``), else the model's declared range, else ``[0, 1]``;
``input_range="any"`` switches the range check off.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

_RANGE = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]")
RANGE_TOLERANCE = 1e-3
"""Values this far outside a declared range still pass (rounding of stored images)."""
BYTE_LIKE_MAX = 10.0
"""Non-negative inputs above this (for a model without a declared range) look like 0-255 images."""
DEFAULT_RANGE = (0.0, 1.0)
"""The range assumed for a model that declares none (images in [0, 1])."""

InputRange = tuple[float, float] | Literal["any"] | None
"""A user's input range: ``(low, high)``; ``"any"`` (no range check); None (the model's declared
range, else :data:`DEFAULT_RANGE`)."""


def declared_range(net: nn.Module) -> tuple[float, float] | None:
    """The ``[low, high]`` input range a model declares (``ood_lens["input_range"]`` or
    ``"... [0, 1] ..."`` in ``ood_lens["normalisation"]``), or None."""
    meta = getattr(net, "ood_lens", None) or {}
    if "input_range" in meta:
        low, high = meta["input_range"]
        return float(low), float(high)
    match = _RANGE.search(str(meta.get("normalisation", "")))
    return (float(match.group(1)), float(match.group(2))) if match else None


def check_input_range(input_range: Any) -> InputRange:
    """``input_range`` if it is None, ``"any"`` or two finite numbers ``low < high``;
    ``ValueError`` else."""
    if input_range is None or input_range == "any":
        return input_range
    try:
        low, high = (float(v) for v in input_range)
        ok = not isinstance(input_range, str) and math.isfinite(low + high) and low < high
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            "input_range must be (low, high) with finite low < high, e.g. (0, 1) or (-2.2, 2.7), "
            f"or 'any' (no range check), or None (the model's declared range, else [0, 1]); got "
            f"{input_range!r}."
        )
    return low, high


def expected_range(
    net: nn.Module, input_range: InputRange = None
) -> tuple[tuple[float, float] | None, str]:
    """``(bounds, source)``: the user's ``input_range`` (``"given"``), else the model's declared
    range (``"declared"``), else ``[0, 1]`` (``"default"``); bounds None for ``"any"``."""
    input_range = check_input_range(input_range)
    if input_range == "any":
        return None, "given"
    if input_range is not None:
        return input_range, "given"
    declared = declared_range(net)
    if declared is not None:
        return declared, "declared"
    return DEFAULT_RANGE, "default"


def _outward(value: float, up: bool) -> str:
    """``value`` rounded outward to one decimal, as typed (``-2.2``, ``2.7``, ``255``)."""
    v = (math.ceil if up else math.floor)(value * 10) / 10
    return f"{v:g}"


def declared_shape(net: nn.Module) -> tuple[int, ...] | None:
    """The per-sample input shape a model declares (``ood_lens["input_shape"]``), or None."""
    shape = (getattr(net, "ood_lens", None) or {}).get("input_shape")
    return tuple(int(d) for d in shape) if shape is not None else None


def show_value(value: float, dtype: torch.dtype = torch.float64) -> str:
    """The shortest text that reads back as ``value`` in ``dtype`` (narrower dtypes than float64:
    as float32), e.g. ``'1.0015'`` where ``:.4g`` would print ``'1.002'`` (and ``1.0005`` as
    ``'1'``)."""
    return repr(float(value)) if dtype == torch.float64 else str(np.float32(value))


def _position(shape: tuple[int, ...], flat_index: int) -> str:
    """``'sample 3, position (0, 14, 2)'`` of a flat index into a batch of ``shape``."""
    index = np.unravel_index(flat_index, shape)
    rest = tuple(int(i) for i in index[1:])
    return f"sample {int(index[0])}" + (f", position {rest}" if rest else "")


def check_inputs(
    net: nn.Module,
    data: Tensor,
    traced_shape: tuple[int, ...] | None = None,
    name: str = "inputs",
    input_range: InputRange = None,
) -> None:
    """Raise ``ValueError`` unless ``data`` is a float batch ``(N, ...)`` of the model's declared
    (else traced) per-sample shape, free of NaN, within the expected value range
    (:func:`expected_range` of ``input_range``)."""
    if not isinstance(data, Tensor):
        raise ValueError(
            f"The {name} must be a torch.Tensor batch (N, C, H, W); got "
            f"{type(data).__name__}. Convert with torch.as_tensor(...)."
        )
    if data.device.type == "meta":
        raise ValueError(
            f"The {name} are on the 'meta' device: a shape without values. Load or compute "
            "real images (e.g. torch.rand(...), or the data on 'cpu' / 'cuda')."
        )
    if data.layout != torch.strided:
        raise ValueError(
            f"The {name} must be a dense tensor; got layout {data.layout}. Convert them with "
            "x.to_dense()."
        )
    if data.ndim < 2:
        raise ValueError(
            f"The {name} must be a batch (N, ...) with a leading sample dimension; got "
            f"shape {tuple(data.shape)}. Add one with x.unsqueeze(0)."
        )
    if len(data) == 0:
        raise ValueError(f"Cannot compute scores on empty {name} (0 samples).")
    if data.is_complex():
        raise ValueError(
            f"The {name} must be real float images; got complex dtype {data.dtype}. Pass "
            "x.real (or x.abs() for magnitudes), in the model's input range."
        )
    if not data.is_floating_point():
        hint = " (0-255 images: x.float() / 255)" if data.dtype == torch.uint8 else ""
        raise ValueError(
            f"The {name} must be float images; got dtype {data.dtype}. Convert them "
            f"to float in the model's input range{hint}."
        )
    expected = declared_shape(net) or traced_shape
    got = tuple(data.shape[1:])
    if expected and got != tuple(expected):
        source = "declares" if declared_shape(net) else "was traced with"
        raise ValueError(
            f"The {name} have per-sample shape {got} but the model {source} {tuple(expected)} "
            "(C, H, W). Resize or convert them (channels, height, width) to match."
        )
    if not bool(torch.isfinite(data).all()):
        for what, bad in (("NaN", torch.isnan(data)), ("infinite", torch.isinf(data))):
            if bad.any():
                first = _position(tuple(data.shape), int(bad.flatten().nonzero()[0]))
                raise ValueError(
                    f"The {name} contain {what} values ({int(bad.sum()):,}, the first at "
                    f"{first}); clean them before scoring."
                )
    bounds, source = expected_range(net, input_range)
    if bounds is not None:
        low, high = bounds
        lo, hi = float(data.min()), float(data.max())
        if lo < low - RANGE_TOLERANCE or hi > high + RANGE_TOLERANCE:
            if source == "declared":
                byte_like = hi > 2 * max(1.0, high)
            else:  # no negative value and a maximum far above 1
                byte_like = lo >= low - RANGE_TOLERANCE and hi > BYTE_LIKE_MAX
            hint = " (0-255 images? divide by 255)" if byte_like else ""
            flat = data.detach().flatten().double()
            outside = (flat < low - RANGE_TOLERANCE) | (flat > high + RANGE_TOLERANCE)
            excess = torch.maximum(low - flat, flat - high)
            worst = int(excess.argmax())
            show = [show_value(v, data.dtype) for v in (lo, hi, float(flat[worst]))]
            where = (
                f"{int(outside.sum()):,} value(s) lie outside [{low:g}, {high:g}] by more than the "
                f"tolerance {RANGE_TOLERANCE:g}; the farthest is {show[2]} at "
                f"{_position(tuple(data.shape), worst)}."
            )
            if source == "default":
                fit = f"({_outward(min(lo, low), False)}, {_outward(max(hi, high), True)})"
                raise ValueError(
                    f"The {name} hold values in [{show[0]}, {show[1]}] but the model declares no "
                    f"input range, so inputs in [0, 1] are assumed{hint}. If the model takes "
                    f"other inputs (e.g. normalised ones), pass input_range={fit} (or "
                    "input_range='any' to switch this check off) to Recorder(...) or "
                    f"fit_scores(...). {where}"
                )
            if source == "given":
                raise ValueError(
                    f"The {name} hold values in [{show[0]}, {show[1]}] but input_range="
                    f"({low:g}, {high:g}) was given{hint}. Rescale them, or pass the range they "
                    f"are in (or input_range='any' to switch this check off). {where}"
                )
            raise ValueError(
                f"The {name} hold values in [{show[0]}, {show[1]}] but the model expects inputs "
                f"in [{low:g}, {high:g}]{hint}. Rescale them (and do not normalise them yourself "
                f"if the model normalises internally). {where}"
            )
