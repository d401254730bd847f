"""Click-to-drawn times of the dashboard in a real headless Chromium (Debian's, via Playwright).

On the bundled default (the Scores page's default scores and scenarios, 1,000 / 1,000):

* ``first_drawn_s``: Run clicked on the Scores page -> Results page drawn (charts rendered);
* ``param_change_drawn_s``: KNN's ``k`` changed, Run clicked -> Results drawn again (KNN is refitted
  from cached features: no forward pass);
* ``reload_param_change_drawn_s``: after F5 (a new session, the run restored from the URL), ``k``
  changed again, Run clicked -> Results drawn (the feature cache is the process's: still no
  forward pass; target <= 3 s). ``reload_forward_passes`` is what the sidebar said of that run;
  ``heading_s``: the same three clicks to the Results heading (the run done, before drawing).

Run: ``.venv/bin/python benchmarks/bench_browser.py [--json] [--n 1000]``. Needs
``/usr/bin/chromium``. Measure alone on the machine: parallel jobs on 2 cores distort timings.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _shots():
    spec = importlib.util.spec_from_file_location(
        "ood_lens_screenshot", ROOT / "scripts" / "screenshot.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_and_wait(app, timeout: float = 300_000) -> tuple[float, float]:
    """Seconds from the Run click to the Results heading (the run is over), and to Results
    drawn (its script has finished and its charts are drawn)."""
    page = app.page
    t0 = time.perf_counter()
    page.locator(".st-key-run button").first.click()
    page.wait_for_selector('h1:has-text("Results")', timeout=timeout)
    heading = time.perf_counter() - t0
    # the Results script has finished and its charts are drawn (no fixed padding in the figure)
    page.wait_for_selector(
        '[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout
    )
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
    return heading, time.perf_counter() - t0


def _change_k(app, value: int) -> None:
    page = app.page
    app.go("Scores", "Scores & scenarios")
    page.locator('[data-testid="stExpander"] summary', has_text="KNN").first.click()
    app.wait_idle()
    box = page.locator(".st-key-w-p-KNN-k input").first  # key "w.p.KNN.k"
    box.fill(str(value))
    box.press("Enter")
    app.wait_idle()


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--n", type=int, default=1000, help="calibration / test sizes")
    args = parser.parse_args()
    shots = _shots()
    with shots.serve(n_default=args.n) as url, sync_playwright() as p:
        browser = shots.launch(p)
        try:
            page = browser.new_page(viewport=shots.VIEWPORT)
            app = shots.Dashboard(page, url)
            app.open()
            app.go("Scores", "Scores & scenarios")
            first_h, first = _run_and_wait(app)
            _change_k(app, 20)
            second_h, second = _run_and_wait(app)
            page.reload()  # F5: a new session, the run restored from ?run=
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=120_000)
            app.wait_idle()
            _change_k(app, 30)
            third_h, third = _run_and_wait(app)
            sidebar = page.locator('[data-testid="stSidebar"]').inner_text()
            passes = next(
                (
                    line.strip()
                    for line in sidebar.splitlines()
                    if "forward pass" in line or "forward-pass" in line
                ),
                "not shown",
            )
        finally:
            browser.close()
    figures = {
        "first_drawn_s": round(first, 2),
        "param_change_drawn_s": round(second, 2),
        "reload_param_change_drawn_s": round(third, 2),
        "heading_s": [round(first_h, 2), round(second_h, 2), round(third_h, 2)],
        "reload_forward_passes": passes,
        "n": args.n,
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"Run -> Results drawn:          {first:6.2f} s")
        print(f"k changed, Run -> redrawn:     {second:6.2f} s")
        print(f"F5, k changed, Run -> redrawn: {third:6.2f} s  ({passes})")


if __name__ == "__main__":
    main()
