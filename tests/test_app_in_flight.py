"""A reload during a Run: the new session learns what became of it (ood_lens_app.in_flight)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from ood_lens_app import in_flight

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


def test_the_registry_follows_a_run_and_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, c = in_flight.start("12:00:00"), in_flight.start("12:00:01"), in_flight.start("12:00:02")
    assert len({a, b, c}) == 3 and len(a) >= 16  # unguessable tokens
    assert in_flight.lookup(a)["status"] == "running"
    in_flight.finish(a, "20261203-120000-000000-abcdef")
    in_flight.finish(b, error="out of memory")
    in_flight.interrupt(c)
    in_flight.interrupt(a)  # an ended run stays ended
    assert [in_flight.lookup(t)["status"] for t in (a, b, c)] == ["done", "failed", "interrupted"]
    kinds = [in_flight.message(in_flight.lookup(t))[0] for t in (a, b, c)]
    assert kinds == ["success", "warning", "warning"]
    assert "20261203-120000-000000-abcdef" in in_flight.message(in_flight.lookup(a))[1]
    assert "out of memory" in in_flight.message(in_flight.lookup(b))[1]
    assert in_flight.message(None)[0] == "info"
    monkeypatch.setattr(in_flight, "MAX_ENTRIES", 2)
    newest = in_flight.start("12:00:03")
    assert in_flight.lookup(a) is None and in_flight.lookup(newest) is not None


def _reloaded(token: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params[in_flight.URL_KEY] = token
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_a_page_reloaded_during_a_run_says_it_is_still_running_then_opens_it() -> None:
    token = in_flight.start("12:00:00")
    at = _reloaded(token)
    assert any("is still running" in m.value for m in at.info), [m.value for m in at.info]
    in_flight.finish(token, "20200101-000000-000000-abcdef")  # the old session saved it
    at.button(key="pending_check").click().run()
    assert any("was saved as `20200101-000000-000000-abcdef`" in m.value for m in at.success)
    at.button(key="pending_close").click().run()  # Open: the URL names the saved run
    assert at.query_params.get("run") in (
        "20200101-000000-000000-abcdef",
        ["20200101-000000-000000-abcdef"],
    )
    assert in_flight.URL_KEY not in at.query_params


def test_a_run_stopped_by_the_reload_is_said_and_dismissed() -> None:
    token = in_flight.start("12:00:00")
    in_flight.interrupt(token)
    at = _reloaded(token)
    assert any("was stopped" in m.value for m in at.warning), [m.value for m in at.warning]
    at.button(key="pending_close").click().run()
    assert in_flight.URL_KEY not in at.query_params
    assert not any("was stopped" in m.value for m in at.warning)
