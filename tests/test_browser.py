"""The served dashboard in a real headless Chromium (Debian's, via Playwright's Python client).

Goes Model -> Layers (ticks two rows of the layer table) -> Scores (two scores, one
perturbation) -> Run -> Results; checks Plotly charts are drawn, the metric table shows numbers,
downloads are non-empty, and no page shows a Streamlit exception or an unexpected error box.
Full-page screenshots go to tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
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
    full = page.locator('[data-testid="stExpander"] summary', has_text="Full table").first
    full.click()  # the full metric table is on demand, under the headline table
    page.wait_for_timeout(800)
    table = page.locator('[data-testid="stDataFrame"]').first
    cells = table.evaluate(
        "e => Array.from(e.querySelectorAll('[role=gridcell], td')).map(x => x.textContent)"
    )
    assert "Softmax()" in cells and "KNN(k=15) @ 1-1, 1-3" in cells
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
    page_text = report.read_text()
    assert report.stat().st_size > 100_000 and "<html" in page_text[:200]
    # a report a review can attach: operating points with counts, and the configuration
    assert "Operating points at 95% InD acceptance" in page_text and " of 300</td>" in page_text
    assert "Configuration (replay with ood-lens run)" in page_text and "[model]" in page_text
    app.page.goto(report.as_uri())  # the downloaded file, opened offline in the browser
    app.page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
    app.page.screenshot(path=str(ARTIFACTS / "report_top.png"))
    app.page.go_back()
    _check_clean(app, "Export")
    assert time.perf_counter() - t0 < 90
    log = (ARTIFACTS / "streamlit.log").read_text()
    assert "Traceback" not in log, "the server logged an error: see tests/artifacts/streamlit.log"


# ============================================================================ issue 11: at a glance
# (appended by the "read at a glance / first screen / report" helper)
FIGURES_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(gd => ({
    key: (gd.closest('[class*="st-key-"]') || {className: ''}).className.match(/st-key-([^ ]+)/)?.[1]
        || null,
    visible: gd.offsetParent !== null,
    legendTitle: gd.layout && gd.layout.legend && gd.layout.legend.title
        ? {text: gd.layout.legend.title.text, color: (gd.layout.legend.title.font || {}).color}
        : null,
    traces: (gd.data || []).map((t, i) => ({
        name: t.name, type: t.type, mode: t.mode,
        marker: t.marker ? t.marker.color : null, line: t.line ? t.line.color : null,
        x: t.type === 'histogram' ? Array.from(((gd._fullData || [])[i] || t).x || []) : null,
    })),
    selections: (gd.layout && gd.layout.selections) || [],
}))"""


def _figures(page: Any) -> list[dict[str, Any]]:
    return page.evaluate(FIGURES_JS)


def test_glance_colours_headline_box_selection_and_screenshots(app: Any) -> None:
    from ood_core import plots

    page = app.page
    app.open()
    assert page.get_by_text("Which confidence score").count() >= 1
    app.screenshot(ARTIFACTS / "glance_0_first_screen.png")
    app.click_key("run_demo")  # runs the bundled default and lands on Results
    page.wait_for_selector('h1:has-text("Results")', timeout=180_000)
    app.wait_idle(180_000)
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
    _check_clean(app, "Results after the demo")
    head = page.locator('[data-testid="stTable"]').first.inner_text()
    assert "mean" in head and "Softmax()" in head

    # one colour per scenario: the histograms' traces and each ROC chart's legend title agree
    figs = _figures(page)
    hist = [f for f in figs if (f["key"] or "").startswith("hist_")]
    rocs = [f for f in figs if (f["key"] or "").startswith("roc_")]
    assert hist and rocs
    colours = {t["name"]: t["marker"] for t in hist[0]["traces"]}
    assert colours["InD"] == plots.SCENARIO_PALETTE[0]
    for f in hist[1:]:  # the same in every histogram
        assert {t["name"]: t["marker"] for t in f["traces"]} == colours
    for f in rocs:
        title = f["legendTitle"]["text"].removeprefix("■ ")
        assert f["legendTitle"]["color"] == colours[title], (title, f["legendTitle"])
    # one colour per score: the same in every ROC chart, the × marker in its score's colour
    per_score = [
        {t["name"]: t["line"] for t in f["traces"] if t["mode"] == "lines" and t["name"]}
        for f in rocs
    ]
    assert all(p == per_score[0] for p in per_score)
    assert not set(per_score[0].values()) & set(colours.values())
    for f in rocs:
        for t in f["traces"]:
            if t["mode"] == "markers":
                assert t["marker"] == per_score[0][t["name"].removesuffix(" @ threshold")]

    # screenshots of Results at both sizes (the viewport as a presenter sees it)
    for w, h in ((1280, 800), (1920, 1080)):
        page.set_viewport_size({"width": w, "height": h})
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / f"glance_results_{w}x{h}.png"))
    page.set_viewport_size(shots.VIEWPORT)
    page.wait_for_timeout(500)

    # the gallery's box selects exactly the samples whose confidence lies in its x-range
    app.tab("Gallery")
    plot = page.locator(".st-key-sel_hist_0 .js-plotly-plot").first
    plot.scroll_into_view_if_needed()
    page.wait_for_timeout(800)
    drag = page.locator(".st-key-sel_hist_0 .nsewdrag").first.bounding_box()
    assert drag is not None
    y = drag["y"] + drag["height"] * 0.5
    page.mouse.move(drag["x"] + drag["width"] * 0.52, y)
    page.mouse.down()
    page.mouse.move(drag["x"] + drag["width"] * 0.71, y + 5, steps=8)
    page.mouse.move(drag["x"] + drag["width"] * 0.73, drag["y"] + drag["height"] * 0.9, steps=4)
    page.mouse.up()
    app.wait_idle()
    page.wait_for_timeout(800)
    sel = next(f for f in _figures(page) if f["key"] == "sel_hist_0")
    assert sel["selections"], "the box selection is not in the figure"
    box = sel["selections"][0]
    x0, x1 = sorted((float(box["x0"]), float(box["x1"])))
    shown = page.locator('[data-testid="stMarkdownContainer"]', has_text="selected sample").all()
    said = {}
    for el in shown:
        m = re.match(r"(.+): (\d+) selected sample", el.inner_text())
        if m:
            said[m.group(1)] = int(m.group(2))
    expected = {
        t["name"]: sum(x0 <= v <= x1 for v in t["x"])
        for t in sel["traces"]
        if t["type"] == "histogram"
    }
    assert said == {k: v for k, v in expected.items() if v}, (said, expected, (x0, x1))
    _check_clean(app, "Gallery selection")
    app.screenshot(ARTIFACTS / "glance_gallery_selection.png")


# ==================================================================================================
# Issue 11, runs persist and honest state: a settings change shows the banner and its Run; a
# reload (F5) restores the run and its settings from the URL (?run=ID); the Runs page compares
# two runs. The server saves runs into a temporary OOD_LENS_RUNS (set before it starts).
# ==================================================================================================
os.environ.setdefault("OOD_LENS_RUNS", tempfile.mkdtemp(prefix="ood-lens-runs-"))


def _url_run(app: Any) -> str:
    found = re.search(r"[?&]run=([0-9a-f-]+)", app.page.url)
    assert found, f"no run id in the URL {app.page.url}"
    return found.group(1)


def _chips(app: Any) -> list[str]:
    return app.page.locator('button[aria-label^="Remove "]').evaluate_all(
        "els => els.map(e => e.getAttribute('aria-label').slice(7))"
    )


def test_reload_restores_the_run_and_compare_shows_both(app: Any) -> None:
    page = app.page
    app.open()
    app.go("Scores", "Scores & scenarios")
    for chip in ("GradNorm", "Gram", "Darker", "Uniformly random", "MNIST digits"):
        app.remove_chip(chip)
    page.locator(".st-key-run button").first.click()
    page.wait_for_selector('h1:has-text("Results")', timeout=60_000)
    app.wait_idle()
    first = _url_run(app)

    app.go("Scores", "Scores & scenarios")
    app.remove_chip("Softmax")
    app.go("Results", "Results")
    banner = page.get_by_text("The settings changed since this result")
    banner.first.wait_for(timeout=30_000)
    _check_clean(app, "Results with changed settings")
    app.screenshot(ARTIFACTS / "6_stale_banner.png")
    app.click_key("stale_run")
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
    assert banner.count() == 0
    second = _url_run(app)
    assert second != first

    page.reload()  # F5: a new session, restored from the URL
    page.wait_for_selector('h1:has-text("Results")', timeout=60_000)
    app.wait_idle()
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
    assert _url_run(app) == second
    page.get_by_text("KNN(k=15)").first.wait_for(timeout=30_000)
    text = page.locator('[data-testid="stMain"]').inner_text()
    assert "KNN(k=15)" in text and "Softmax()" not in text, text[:2000]
    assert page.get_by_text("The settings changed since this result").count() == 0
    _check_clean(app, "Results after a reload")
    app.screenshot(ARTIFACTS / "7_reloaded.png")
    app.tab("Threshold explorer")  # the view goes into the URL: a reload reopens that tab
    page.wait_for_function("() => location.search.includes('tab=Threshold')", timeout=30_000)
    page.reload()
    page.wait_for_selector('h1:has-text("Results")', timeout=60_000)
    app.wait_idle()
    page.get_by_text("InD acceptance (1 - FPR)").first.wait_for(timeout=30_000)
    selected = page.locator('[data-testid="stTab"][aria-selected="true"]').first.inner_text()
    assert "Threshold explorer" in selected, selected
    _check_clean(app, "Threshold explorer after a reload")
    app.go("Scores", "Scores & scenarios")
    chips = _chips(app)
    assert "KNN" in chips and "Softmax" not in chips and "Vertical flip" in chips, chips

    # a third run differing by one parameter: the Runs page pairs KNN(k=15) with KNN(k=50)
    page.locator('[data-testid="stExpander"] summary', has_text="KNN(k=15)").first.click()
    field = page.locator(".st-key-w-p-KNN-k input").first
    field.fill("50")
    field.press("Enter")
    app.wait_idle()
    page.locator(".st-key-run button").first.click()
    page.wait_for_selector('h1:has-text("Results")', timeout=60_000)
    app.wait_idle()
    third = _url_run(app)
    assert third not in (first, second)
    # the feature cache is the process's: after F5 the k change ran no forward pass
    sidebar = page.locator('[data-testid="stSidebar"]').inner_text()
    assert "no shared forward pass (cached features)" in sidebar, sidebar[:1500]
    assert "own passes" not in sidebar, sidebar[:1500]

    app.go("Runs", "Runs")
    page.locator(".st-key-runs_roc .js-plotly-plot .main-svg").first.wait_for(timeout=30_000)
    text = page.locator('[data-testid="stMain"]').inner_text()
    assert f"A: {second}" in text and f"B: {third}" in text, text[:2000]
    assert "What changed from A to B" in text and ": k 15 → 50" in text, text[:2000]
    cells = page.locator('[data-testid="stDataFrame"]').last.evaluate(  # the comparison
        "e => Array.from(e.querySelectorAll('[role=gridcell], td')).map(x => x.textContent)"
    )
    assert "KNN(k=15) → KNN(k=50)" in cells and "not in A" not in cells, cells
    deltas = [c for c in cells if re.fullmatch(r"[+-]\d\.\d{3}", c or "")]
    assert len(deltas) == 4 and any(d not in ("+0.000", "-0.000") for d in deltas), cells
    _check_clean(app, "Runs")
    app.screenshot(ARTIFACTS / "8_runs_compare.png")
    page.locator(".st-key-runs_changed_only label").first.click()  # the toggle
    app.wait_idle()
    _check_clean(app, "Runs, changed only")


def test_a_parameter_sweep_and_a_layer_sweep_draw_the_study_with_a_best_mark(app: Any) -> None:
    """KNN swept over k in {5, 15, 50} and Gram over its three layers one by one, in one Run:
    the Study tab draws both sweeps, each with its best point starred, and ranks them."""
    page = app.page
    app.open()
    app.go("Scores", "Scores & scenarios")
    for chip in ("GradNorm", "Softmax", "Darker", "Uniformly random", "MNIST digits"):
        app.remove_chip(chip)
    page.locator('[data-testid="stExpander"] summary', has_text="KNN(k=15)").first.click()
    box = page.locator(".st-key-w-psweep-KNN")
    app.wait_idle()
    combo = box.locator("input").first  # a combo box: typing filters its options
    combo.click()
    combo.fill("k")
    page.get_by_role("option", name="k", exact=True).first.click()
    app.wait_idle()
    values = page.locator(".st-key-w-psweepv-KNN input").first
    values.fill("5, 15, 50")
    values.press("Enter")
    app.wait_idle()
    page.locator('[data-testid="stExpander"] summary', has_text="Gram").first.click()
    page.locator(".st-key-w-sweep-Gram label").first.click()
    app.wait_idle()
    _check_clean(app, "Scores with two sweeps")
    page.locator(".st-key-run button").first.click()
    page.wait_for_selector('h1:has-text("Results")', timeout=120_000)
    app.wait_idle()
    app.tab("Study")
    chart = page.locator(".st-key-study_chart .js-plotly-plot").first
    chart.wait_for(timeout=30_000)
    traces = chart.evaluate(
        "gd => gd._fullData.map(t => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y),"
        " star: !!(t.marker && t.marker.symbol === 'star')}))"  # _fullData: decoded arrays
    )
    lines = {t["name"]: t for t in traces if not t["star"]}
    assert set(lines) == {"KNN (over k)", "Gram (over layer)"}, traces
    assert lines["KNN (over k)"]["x"] == ["k=5", "k=15", "k=50"]
    assert lines["Gram (over layer)"]["x"] == ["1-5", "1-11", "1-12"]  # network order
    stars = [t for t in traces if t["star"]]
    assert len(stars) == 2
    for star, line in zip(stars, lines.values(), strict=True):
        assert star["y"][0] == max(line["y"])  # the star sits on each sweep's best point
    cells = page.locator('[data-testid="stDataFrame"]').last.evaluate(
        "e => Array.from(e.querySelectorAll('[role=gridcell], td')).map(x => x.textContent)"
    )
    assert "KNN" in cells and "Gram" in cells and "layer" in cells and "k" in cells, cells
    assert "None" not in cells and any(c.startswith("+0.") for c in cells), cells  # signed margins
    _check_clean(app, "Study")
    app.screenshot(ARTIFACTS / "study_1280x800.png")  # before the download's toasts
    page.set_viewport_size({"width": 1920, "height": 1080})
    page.wait_for_timeout(800)
    page.screenshot(path=str(ARTIFACTS / "study_1920x1080.png"))
    page.set_viewport_size(shots.VIEWPORT)
    chart.hover()  # the toolbar shows on hover; its camera saves the chart as an SVG
    with page.expect_download(timeout=30_000) as got:
        page.locator(".st-key-study_chart .modebar-btn[data-title='Download plot']").first.click()
    download = got.value
    assert download.suggested_filename == "ood-lens-study_chart.svg"
    svg = Path(download.path()).read_text()
    assert svg.lstrip().startswith("<svg") and "KNN (over k)" in svg, svg[:300]


def test_comfortable_controls_at_1280x800(app: Any) -> None:
    """Run is visible without scrolling; chips show their whole label; a score's panel stays
    open while its parameter is edited; the layer table has thousands separators and filters."""
    page = app.page
    app.open()
    app.go("Scores", "Scores & scenarios")
    _check_clean(app, "Scores & scenarios")
    assert page.viewport_size == {"width": 1280, "height": 800}
    box = page.locator(".st-key-run button").first.bounding_box()
    assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= 800, box
    page.screenshot(path=str(ARTIFACTS / "controls_scores_1280x800.png"))
    # every selected chip shows its whole label (no "TPR(max_fpr=..." ellipsis)
    cut = page.locator(
        '[data-testid="stMultiSelectTagsContainer"] button[aria-label^="Remove "]'
    ).evaluate_all(
        """els => els.map(b => b.parentElement).filter(chip => {
            const box = chip.closest('.stMultiSelect').getBoundingClientRect();
            const r = chip.getBoundingClientRect();
            return r.right > box.right + 1 || r.bottom > box.bottom + 1
                || chip.scrollWidth > chip.clientWidth + 1;
        }).map(chip => chip.textContent)"""
    )
    assert cut == [], cut
    # editing a parameter keeps the panel open (its title changes with the value)
    page.locator('[data-testid="stExpander"] summary', has_text="KNN(k=15)").first.click()
    field = page.locator(".st-key-w-p-KNN-k input").first
    field.fill("7")
    field.press("Enter")
    app.wait_idle()
    knn = page.locator('[data-testid="stExpander"] details', has_text="KNN(k=7)").first
    assert knn.get_attribute("open") is not None
    assert page.locator(".st-key-w-p-KNN-k input").first.is_visible()
    app.screenshot(ARTIFACTS / "controls_scores_edited.png")
    # scrolled to the bottom of the form, the sidebar's Run is still in the viewport
    page.locator(
        ".st-key-replay_file, [data-testid='stExpander']"
    ).last.scroll_into_view_if_needed()
    page.mouse.wheel(0, 5000)
    page.wait_for_timeout(300)
    top = page.locator(".st-key-run button").first.bounding_box()
    assert top is not None and top["y"] + top["height"] < 0, top  # the page's Run scrolled away
    side = page.locator(".st-key-run_side button").first.bounding_box()
    assert side is not None and side["y"] >= 0 and side["y"] + side["height"] <= 800, side

    app.go("Layers", "Layers")
    grid = page.locator('[data-testid="stDataFrame"]').first
    grid.wait_for(timeout=30_000)
    page.locator(".st-key-layers_selected_only label").first.click()
    app.wait_idle()
    _check_clean(app, "Layers")
    app.screenshot(ARTIFACTS / "controls_layers_selected_only.png")


# ==================================================================================================
# Issue 15: two users at once. Two browser contexts (two sessions of one server, sharing its
# cached model object) click Run together; both complete, with the numbers of a serial run.
# ==================================================================================================
def test_two_sessions_running_at_once_match_a_serial_run(server_url: str, tmp_path: Path) -> None:
    import io

    import numpy as np
    import pandas as pd

    from ood_core.config import RunConfig
    from ood_core.runner import RunCache, run

    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = shots.launch(p)
        try:
            apps = []
            for _ in range(2):
                context = browser.new_context(viewport=shots.VIEWPORT, accept_downloads=True)
                apps.append(shots.Dashboard(context.new_page(), server_url))
            for app in apps:
                app.open()
                app.go("Scores", "Scores & scenarios")
                for chip in ("GradNorm", "Darker", "Uniformly random"):
                    app.remove_chip(chip)
            for app in apps:  # both Runs in flight at once
                app.page.locator(".st-key-run button").first.click()
            frames, configs = [], []
            for i, app in enumerate(apps):
                app.page.wait_for_selector('h1:has-text("Results")', timeout=180_000)
                app.wait_idle(180_000)
                app.page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
                _check_clean(app, f"Results of session {i + 1}")
                app.screenshot(ARTIFACTS / f"concurrent_{i + 1}.png")
                app.tab("Export")
                (tmp_path / str(i)).mkdir()
                frames.append(pd.read_csv(_download(app, "Metrics (CSV)", tmp_path / str(i))))
                configs.append(_download(app, "Run config (TOML)", tmp_path / str(i)).read_text())
        finally:
            browser.close()
    assert configs[0] == configs[1]
    serial = run(RunConfig.from_toml(configs[0]), RunCache())
    want = pd.read_csv(io.StringIO(serial.frame.to_csv(index=False)))
    assert len(want) >= 3 * 2  # scores x scenarios
    for got in frames:
        assert list(got.columns) == list(want.columns)
        pd.testing.assert_frame_equal(
            got.select_dtypes(exclude=np.number), want.select_dtypes(exclude=np.number)
        )
        np.testing.assert_allclose(
            got.select_dtypes(np.number).to_numpy(),
            want.select_dtypes(np.number).to_numpy(),
            rtol=0,
            atol=1e-9,
        )


# ==================================================================================================
# Issue 15: a local-only tool makes no outside request (favicon, fonts, icons).
# ==================================================================================================
def test_served_dashboard_requests_only_its_own_server(server_url: str) -> None:
    """A page load and two page changes: every request goes to the dashboard's own server
    (127.0.0.1), none to a font, emoji or icon host."""
    sync_api = pytest.importorskip("playwright.sync_api")
    urls: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = shots.launch(p)
        try:
            page = browser.new_page(viewport=shots.VIEWPORT)
            page.on("request", lambda r: urls.append(r.url))
            app = shots.Dashboard(page, server_url)
            app.open()
            app.go("Layers", "Layers")
            app.wait_idle()
            app.go("Runs", "Runs")
            app.wait_idle()
            page.wait_for_timeout(1000)
            icon = page.evaluate(
                "() => Array.from(document.querySelectorAll('link[rel~=icon]')).map(l => l.href)"
            )
        finally:
            browser.close()
    assert urls, "no request recorded"
    outside = sorted({u for u in urls if not u.startswith(("http://127.0.0.1:", "data:", "blob:"))})
    assert outside == [], outside
    assert icon and all(h.startswith(server_url) for h in icon), icon
