"""Warnings about degenerate fits and results: one category, messages that name what and where.

Every degenerate situation (a singular covariance, a class with too few samples, a constant
feature, all confidences tied on a set, a layer that contributes nothing) is reported with
:class:`OodLensWarning`, never hidden by a silent fallback. Messages read
``"<Score> @ <layer>: <problem>: <remedy>"`` so that the CLI can print them and the dashboard can
show them beside the results they concern.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ood_core.layer_ids import layer_text


class OodLensWarning(UserWarning):
    """A number was computed from a degenerate fit or set; the message says what and the remedy."""


def degenerate(
    score: Any, problem: str, remedy: str, *, layer: Any = None, stacklevel: int = 2
) -> str:
    """Emit an :class:`OodLensWarning` ``"<score> @ <layer>: <problem>: <remedy>"``; return it.

    ``score``: a score instance or a name; ``layer``: a layer id (or None when it concerns the
    whole score).
    """
    name = score if isinstance(score, str) else type(score).__name__
    where = f"{name} @ {layer_text(layer)}" if layer is not None else name
    message = f"{where}: {problem}: {remedy}"
    warnings.warn(message, OodLensWarning, stacklevel=stacklevel + 1)
    return message


def warn_if_tied(score: Any, confidences: Any, dataset: str | None = None) -> bool:
    """Warn when all of ``score``'s confidences ``(n,)`` on a set of n >= 2 samples are equal.

    Such a set cannot be ranked: every metric computed on it only reflects the tie rule (a
    pessimistic AUC is 0, a tie-averaged one 0.5). Returns True when it warned.
    """
    values = confidences.flatten()
    if len(values) < 2 or not bool((values == values[0]).all()):
        return False
    where = f"on {dataset!r}" if dataset else "on this set"
    degenerate(
        score,
        f"all {len(values):,} confidences {where} are identical ({float(values[0]):.6g}), so no "
        "threshold separates anything and its metrics only reflect the tie rule",
        "check the inputs (all-equal or all-zero images?), the calibration labels (a single "
        "class?) and the parameters (mode='diff' on a one-value-per-sample score is always 0, an "
        "extreme temperature saturates)",
        stacklevel=3,
    )
    return True


@contextmanager
def collect(reemit: bool = True) -> Iterator[list[str]]:
    """Collect the :class:`OodLensWarning` messages raised in the block (into the yielded list,
    filled when the block ends); every warning is emitted again afterwards unless ``reemit`` is
    False, so callers further out still see them."""
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield messages
    for w in caught:
        if issubclass(w.category, OodLensWarning):
            messages.append(str(w.message))
        if reemit:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def about(score: Any, messages: list[str]) -> list[str]:
    """The messages of ``messages`` that concern ``score`` (they start with its class name)."""
    name = type(score).__name__
    return [m for m in messages if m.startswith((f"{name} @ ", f"{name}: "))]
