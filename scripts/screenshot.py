"""Serve the dashboard, run the default evaluation in headless Chromium, save screenshots.

    python scripts/screenshot.py                 # docs/results.png (Results page, full height)
    python scripts/screenshot.py --all --n 1000  # also docs/model.png, layers.png, scores.png

Uses Debian's chromium (/usr/bin/chromium) through Playwright's Python client; never downloads
a browser. The helpers (:func:`serve`, :func:`launch`, :class:`Dashboard`) are shared with
``tests/test_browser.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("OOD_LENS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 800}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(
    n_default: int | None = None,
    port: int | None = None,
    timeout: float = 60.0,
    log_path: Path | None = None,
) -> Iterator[str]:
    """Run ``streamlit run app.py`` on a free local port; yield its URL; always stop it."""
    port = port or free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OOD_LENS_QUIET="1")
    # a served copy for tests, screenshots and benchmarks keeps its runs out of ~/.cache
    env.setdefault("OOD_LENS_RUNS", tempfile.mkdtemp(prefix="ood-lens-runs-"))
    if n_default is not None:
        env["OOD_LENS_DEFAULT_N"] = str(n_default)
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(ROOT / "app.py"),
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--server.address",
        "127.0.0.1",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
    ]
    log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited early with code {proc.returncode}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"streamlit did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if log_path:
            log.close()  # type: ignore[union-attr]


def launch(playwright: Any) -> Any:
    """Debian's headless chromium (no downloaded browser)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


class Dashboard:
    """Drives the served dashboard in one Playwright page."""

    def __init__(self, page: Any, url: str) -> None:
        self.page = page
        self.url = url

    # ------------------------------------------------------------------ waiting
    def wait_idle(self, timeout: float = 120_000) -> None:
        """Wait until the script run triggered by the last action has finished."""
        page = self.page
        with contextlib.suppress(Exception):
            page.wait_for_selector(
                '[data-testid="stApp"][data-test-script-state="running"]', timeout=700
            )
        page.wait_for_selector(
            '[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout
        )
        page.wait_for_timeout(300)

    def open(self) -> None:
        self.page.goto(self.url)
        self.page.wait_for_selector("h1", timeout=60_000)
        self.wait_idle()

    def go(self, nav_label: str, title: str) -> None:
        """Click a sidebar navigation link and wait for the page titled ``title``."""
        self.page.click(f'[data-testid="stSidebarNav"] a:has-text("{nav_label}")')
        self.page.wait_for_selector(f'h1:has-text("{title}")', timeout=60_000)
        self.wait_idle()

    # ------------------------------------------------------------------ widgets
    def click_button(self, label: str) -> None:
        self.page.locator("button", has_text=label).first.click()
        self.wait_idle()

    def click_key(self, key: str) -> None:
        """Click the button of the widget created with ``key=...`` (Streamlit adds the CSS
        class ``st-key-<key>`` to its container)."""
        self.page.locator(f".st-key-{key} button").first.click()
        self.wait_idle()

    def remove_chip(self, label: str) -> None:
        """Remove a selected value from a multiselect by its chip's close button."""
        self.page.locator(f'button[aria-label="Remove {label}"]').first.click()
        self.wait_idle()

    def click_table_row(
        self, row: int, table: int = 0, header: float = 35.0, row_height: float = 35.0
    ) -> None:
        """Tick the row-selection checkbox of ``row`` (0-based) of an st.dataframe (a canvas
        grid): the first column, at the row's height."""
        frame = self.page.locator('[data-testid="stDataFrame"]').nth(table)
        frame.scroll_into_view_if_needed()
        box = frame.bounding_box()
        assert box is not None
        self.page.mouse.click(box["x"] + 16, box["y"] + header + row_height * (row + 0.5))
        self.wait_idle()

    def tab(self, label: str) -> None:
        """Open a Results tab; the tabs are lazy (a click re-runs the page to draw that tab)."""
        self.page.locator('[data-testid="stTab"]', has_text=label).first.click()
        self.wait_idle()

    # ------------------------------------------------------------------ checks / output
    def exceptions(self) -> int:
        return self.page.locator('[data-testid="stException"]').count()

    def errors(self) -> list[str]:
        return [
            e.inner_text() for e in self.page.locator('[data-testid="stAlertContentError"]').all()
        ]

    def screenshot(self, path: Path) -> None:
        """The whole page (the app scrolls inside its main block: grow the viewport to it)."""
        page = self.page
        height = page.evaluate(
            "() => { const m = document.querySelector('[data-testid=\"stMain\"]');"
            " return m ? m.scrollHeight : document.body.scrollHeight; }"
        )
        page.set_viewport_size(
            {"width": VIEWPORT["width"], "height": max(VIEWPORT["height"], int(height))}
        )
        page.wait_for_timeout(800)  # let Plotly relayout
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path), full_page=True)
        page.set_viewport_size(VIEWPORT)
        page.wait_for_timeout(300)

    def run_default_from_results(self, timeout: float = 180_000) -> float:
        """On the Results page with no result: click the default-run button; seconds taken."""
        t0 = time.perf_counter()
        self.page.locator(".st-key-run_default button").first.click()
        self.page.wait_for_selector('[data-testid="stTab"]', timeout=timeout)
        self.wait_idle(timeout)
        self.page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
        return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="output folder")
    parser.add_argument("--n", type=int, default=1000, help="calibration / test sizes")
    parser.add_argument("--all", action="store_true", help="screenshot every page")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with serve(args.n) as url, sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            app = Dashboard(page, url)
            app.open()
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
            if args.all:
                app.screenshot(args.out / "model.png")
                app.go("Layers", "Layers")
                app.screenshot(args.out / "layers.png")
                app.go("Scores", "Scores & scenarios")
                app.screenshot(args.out / "scores.png")
            app.go("Results", "Results")
            seconds = app.run_default_from_results()
            print(f"default run shown after {seconds:.1f} s")
            if app.exceptions() or app.errors():
                print(f"the Results page shows errors: {app.errors()}", file=sys.stderr)
                return 1
            app.screenshot(args.out / "results.png")
            print(f"wrote {args.out / 'results.png'}")
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
