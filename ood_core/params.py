"""Declared parameters: what a score or a perturbation accepts, enough for a UI to build widgets.

A :class:`Param` names a constructor argument, its type, default and allowed range, and validates
values with messages that name the owner, the parameter, the value and the allowed range.

Parameters that scale work or memory either declare a bound (``high``, with its reason in
``help``, e.g. ``Gram(max_gram_order <= 64)``), which validation, widgets, the CLI and the README
pick up, or the owner estimates the memory they need before computing and refuses with the
number (:func:`ood_core.budget.check_budget`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

_PARAM_TYPES = ("float", "int", "bool", "choice", "str", "list")


@dataclass(frozen=True)
class Param:
    """Description of one constructor parameter (enough for a UI to build a widget).

    ``type`` is one of ``float``, ``int``, ``bool``, ``choice``, ``str`` or ``list`` (a list of
    numbers or strings). ``low``/``high`` are inclusive bounds unless ``low_exclusive`` /
    ``high_exclusive`` is set; ``None`` means unbounded. ``choices`` lists the allowed values of a
    ``"choice"`` parameter. ``nullable``: ``None`` is also accepted. ``required``: no default, the
    user must give a value (``default`` is then only a suggestion for UIs).
    """

    name: str
    type: str
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    help: str = ""
    low_exclusive: bool = False
    high_exclusive: bool = False
    nullable: bool = False
    required: bool = False
    allow_inf: bool = False
    nonzero: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Machine-readable description (name, type, default, range, help...)."""
        return {
            "name": self.name,
            "type": self.type,
            "default": self.default,
            "low": self.low,
            "high": self.high,
            "choices": self.choices,
            "range": self.range_text(),
            "nullable": self.nullable,
            "required": self.required,
            "help": self.help,
            "low_exclusive": self.low_exclusive,
            "high_exclusive": self.high_exclusive,
            "allow_inf": self.allow_inf,
            "nonzero": self.nonzero,
        }

    def __post_init__(self) -> None:
        if self.type not in _PARAM_TYPES:
            raise ValueError(
                f"Param {self.name!r}: type must be one of {_PARAM_TYPES}, got {self.type!r}"
            )
        if self.type == "choice" and not self.choices:
            raise ValueError(f"Param {self.name!r}: a 'choice' parameter needs choices")

    def range_text(self) -> str:
        """The allowed values as text, e.g. ``'(0, 1]'``, ``'>= 0'`` or ``"one of ('a', 'b')"``."""
        if self.type == "choice":
            return f"one of {tuple(self.choices or ())}"
        if self.type == "bool":
            return "True or False"
        if self.type in ("str", "list"):
            return "a string" if self.type == "str" else "a list"
        if self.low is not None and self.high is not None:
            left = "(" if self.low_exclusive else "["
            right = ")" if self.high_exclusive else "]"
            return f"{left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{'>' if self.low_exclusive else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_exclusive else '<='} {self.high:g}"
        if self.nonzero:
            return "any non-zero value" if self.type == "float" else "any non-zero integer"
        return "any finite value" if self.type == "float" else "any integer"

    def validate(self, value: Any, owner: str) -> Any:
        """Return ``value`` normalised to the parameter type, or raise ``ValueError``."""
        where = f"{owner}: parameter {self.name!r}"
        if value is None and self.nullable:
            return None
        if self.type == "str":
            if not isinstance(value, str):
                raise ValueError(f"{where} must be a string, got {value!r}")
            return value
        if self.type == "list":
            if isinstance(value, str) or not isinstance(value, list | tuple):
                raise ValueError(f"{where} must be a list, got {value!r}")
            return tuple(value)
        if self.type == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be a bool, got {value!r} ({type(value).__name__})")
            return value
        if self.type == "choice":
            if value not in (self.choices or ()):
                raise ValueError(f"{where} must be {self.range_text()}, got {value!r}")
            return value
        if self.type == "int":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(
                    f"{where} must be an int in {self.range_text()}, "
                    f"got {value!r} ({type(value).__name__})"
                )
            value = int(value)
        else:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(
                    f"{where} must be a float in {self.range_text()}, "
                    f"got {value!r} ({type(value).__name__})"
                )
            value = float(value)
            if not math.isfinite(value) and not (self.allow_inf and value == math.inf):
                raise ValueError(f"{where} must be finite, in {self.range_text()}, got {value!r}")
        ok = not (self.nonzero and value == 0)
        if self.low is not None:
            ok &= value > self.low if self.low_exclusive else value >= self.low
        if self.high is not None:
            ok &= value < self.high if self.high_exclusive else value <= self.high
        if not ok:
            raise ValueError(f"{where} must be in {self.range_text()}, got {value!r}")
        return value


def fmt_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
