"""The served dashboard in a real headless Chromium (Debian's, via Playwright's Python client).

Goes Model -> Layers (ticks two rows of the layer table) -> Scores (two scores, one
perturbation) -> Run -> Results; checks Plotly charts are drawn, the metric table shows numbers,
downloads are non-empty, and no page shows a Streamlit exception or an unexpected error box.
Full-page screenshots go to tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import importlib.util
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"
    ),
]


def _helpers() -> Any:
    spec = importlib.util.spec_from_file_location(
        "ood_lens_screenshot", ROOT / "scripts" / "screenshot.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shots = _helpers()


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with shots.serve(n_default=300, log_path=ARTIFACTS / "streamlit.log") as url:
        yield url


@pytest.fixture()
def app(server_url: str) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = shots.launch(p)
        try:
            page = browser.new_page(viewport=shots.VIEWPORT, accept_downloads=True)
            yield shots.Dashboard(page, server_url)
        finally:
            browser.close()


def _check_clean(app: Any, where: str) -> None:
    assert app.exceptions() == 0, f"{where}: the page shows a Streamlit exception"
    assert app.errors() == [], f"{where}: unexpected error box(es): {app.errors()}"


def _download(app: Any, label: str, tmp_path: Path) -> Path:
    with app.page.expect_download(timeout=60_000) as info:
        app.page.locator("button", has_text=label).first.click()
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)
    return path


def test_dashboard_flow_in_chromium(app: Any, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    page = app.page
    app.open()
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)  # image preview
    _check_clean(app, "Model & data")
    assert page.get_by_text("Test accuracy").count() >= 1
    app.screenshot(ARTIFACTS / "1_model_data.png")

    app.go("Layers", "Layers")
    app.click_button("Clear")
    app.click_table_row(1)  # 1-1 conv1
    app.click_table_row(4)  # 1-3 l1 (the first block)
    chips = page.locator('button[aria-label^="Remove "]').evaluate_all(
        "els => els.map(e => e.getAttribute('aria-label'))"
    )
    assert chips == ["Remove 1-1 · conv1", "Remove 1-3 · l1"]
    _check_clean(app, "Layers")
    app.screenshot(ARTIFACTS / "2_layers.png")

    app.go("Scores", "Scores & scenarios")
    for chip in ("GradNorm", "Gram", "Darker", "Uniformly random", "MNIST digits"):
        app.remove_chip(chip)
    knn = page.locator('[data-testid="stExpander"] summary', has_text="KNN(k=15)").first
    assert "layers 1-1, 1-3" in knn.inner_text()  # the Layers page selection
    _check_clean(app, "Scores & scenarios")
    app.screenshot(ARTIFACTS / "3_scores.png")

    page.locator(".st-key-run button").first.click()
    page.wait_for_selector('h1:has-text("Results")', timeout=60_000)
    app.wait_idle()
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
    assert page.locator(".js-plotly-plot .main-svg").count() >= 3  # histograms + ROC
    table = page.locator('[data-testid="stDataFrame"]').first
    cells = table.evaluate(
        "e => Array.from(e.querySelectorAll('[role=gridcell], td')).map(x => x.textContent)"
    )
    assert "Softmax()" in cells and "KNN(k=15) @ (1, 1), (1, 3)" in cells
    numbers = [float(c) for c in cells if re.fullmatch(r"[01](\.\d+)?", c or "")]
    assert len(numbers) == 2 * 4, cells  # 2 scores x 4 metrics
    assert all(0 <= v <= 1 for v in numbers)
    _check_clean(app, "Results")
    app.screenshot(ARTIFACTS / "4_results.png")

    app.tab("Threshold explorer")
    _check_clean(app, "Threshold explorer")
    app.tab("Gallery")
    page.locator(".js-plotly-plot .main-svg >> visible=true").first.wait_for(timeout=30_000)
    _check_clean(app, "Gallery")
    app.screenshot(ARTIFACTS / "5_gallery.png")
    app.tab("Export")
    csv = _download(app, "Metrics (CSV)", tmp_path)
    assert csv.stat().st_size > 0 and "AUC(max_fpr=0.2)" in csv.read_text()
    toml = _download(app, "Run config (TOML)", tmp_path)
    assert "[model]" in toml.read_text()
    report = _download(app, "Report (HTML)", tmp_path)
    assert report.stat().st_size > 100_000 and "<html" in report.read_text()[:200]
    _check_clean(app, "Export")
    assert time.perf_counter() - t0 < 90
    log = (ARTIFACTS / "streamlit.log").read_text()
    assert "Traceback" not in log, "the server logged an error: see tests/artifacts/streamlit.log"
