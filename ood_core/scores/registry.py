"""The score registry: every score class decorated with :func:`register_score` (built-in or
yours) is listed, documented and offered by the CLI and the dashboard."""

from __future__ import annotations

from ood_core.registry import Registry

SCORES: Registry = Registry("score")
"""Score name -> class, in registration order (module import order, then definition order)."""


def register_score(cls: type) -> type:
    """Class decorator adding a score to :data:`SCORES` (and so to the CLI and the dashboard)."""
    from ood_core.scores.base import BaseScore

    if not (isinstance(cls, type) and issubclass(cls, BaseScore)):
        raise TypeError(f"{cls!r} is not a BaseScore subclass")
    return SCORES.register(cls)
