"""Which errors are the user's (their message is shown as is) and the messages the pages show
for the others (never a traceback: that goes to the server log)."""

from __future__ import annotations

from ood_core.data import DataUnavailableError
from ood_core.hub import HubUnavailableError

EXPECTED_ERRORS = (HubUnavailableError, DataUnavailableError, ValueError)
"""Errors whose message is for the user (a bad choice, an unreachable source); anything else
is a bug, logged with its traceback."""


def is_expected(exc: BaseException) -> bool:
    return isinstance(exc, EXPECTED_ERRORS)


def page_message(exc: Exception) -> str:
    """What a page shows for an error raised while drawing it."""
    if is_expected(exc):
        return str(exc)
    return (
        f"Something went wrong: {type(exc).__name__}: {exc}. Check your choices on the "
        "previous pages (model, data, layers, score parameters) and try again; the details "
        "are in the server log."
    )


def run_message(exc: Exception) -> str:
    """What the Run button shows when the run failed."""
    return str(exc) if is_expected(exc) else f"The run failed: {type(exc).__name__}: {exc}"


def load_message(exc: Exception, what: str) -> str:
    """What the Model & data page shows when loading ``what`` failed."""
    return str(exc) if is_expected(exc) else f"Could not load {what}: {type(exc).__name__}: {exc}"
