"""Runs in flight, for the whole dashboard process: what became of a Run when the page was
reloaded while it ran (F5 starts a new session; the old one may finish and save the run, or
be stopped).

Each Run gets an unguessable token, put into the URL (``?pending=TOKEN``) while it runs and
removed when it ends. A session that finds a token it did not start looks it up here:
``running``, ``done`` (with the saved run's id, None if it could not be saved), ``failed``
(with the message) or ``interrupted`` (stopped before it ended: nothing saved). The registry is
bounded (:data:`MAX_ENTRIES`, oldest forgotten first) and thread-safe (sessions are threads)."""

from __future__ import annotations

import secrets
import threading
from typing import Any

MAX_ENTRIES = 256
URL_KEY = "pending"
"""The URL key naming the Run in progress."""
_LOCK = threading.Lock()
_RUNS: dict[str, dict[str, Any]] = {}


def start(started: str) -> str:
    """Register a Run started at ``started`` (a clock time); its token."""
    token = secrets.token_urlsafe(12)
    with _LOCK:
        _RUNS[token] = {"status": "running", "started": started, "run_id": None, "error": None}
        while len(_RUNS) > MAX_ENTRIES:
            del _RUNS[next(iter(_RUNS))]
    return token


def finish(token: str, run_id: str | None = None, error: str | None = None) -> None:
    """The Run ended: ``done`` (``run_id``: where it was saved) or, with ``error``, ``failed``."""
    with _LOCK:
        if token in _RUNS:
            _RUNS[token].update(status="failed" if error else "done", run_id=run_id, error=error)


def interrupt(token: str) -> None:
    """The Run was stopped before it ended (a BaseException: the session went away)."""
    with _LOCK:
        if token in _RUNS and _RUNS[token]["status"] == "running":
            _RUNS[token]["status"] = "interrupted"


def lookup(token: str) -> dict[str, Any] | None:
    """A copy of the Run's entry (None: unknown here, e.g. the server restarted since)."""
    with _LOCK:
        found = _RUNS.get(token)
        return None if found is None else dict(found)


def message(entry: dict[str, Any] | None) -> tuple[str, str]:
    """``(kind, text)`` to show a session that found the Run's token in its URL: kind is
    ``info`` (still running, or unknown), ``success`` (saved) or ``warning``."""
    if entry is None:
        return "info", (
            "This link waited for a run this server does not know (it was restarted since); "
            "open it from the Runs page if it was saved."
        )
    when = f"The run started at {entry['started']}"
    status = entry["status"]
    if status == "running":
        return "info", (
            f"{when}, before this page was reloaded, is still running; it is saved when it "
            "ends. Check again in a moment."
        )
    if status == "done" and entry["run_id"]:
        return (
            "success",
            f"{when} finished after this page was reloaded and was saved as `{entry['run_id']}`.",
        )
    if status == "done":
        return "warning", f"{when} finished after this page was reloaded but could not be saved."
    if status == "failed":
        return "warning", f"{when} failed after this page was reloaded: {entry['error']}"
    return "warning", f"{when} was stopped when this page was reloaded; nothing was saved."
