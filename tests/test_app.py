"""Streamlit AppTest checks of the dashboard: pages render, state flows between pages, a run
matches ood_core.eval called directly, bad inputs give st.error (never an exception)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from ood_lens_app import run_store

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PAGES = ["views/model_data.py", "views/layers.py", "views/scores.py", "views/results.py"]
TIMEOUT = 180

os.environ.setdefault("OOD_LENS_QUIET", "1")


def _errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def _assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not _errors(at), _errors(at)


def _app(**state: object) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for key, value in state.items():
        at.session_state[key] = value
    return at


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_alone_on_the_default(page: str) -> None:
    at = AppTest.from_file(str(ROOT / page), default_timeout=TIMEOUT)
    at.run()
    _assert_clean(at)
    assert at.title, "every page has a title"


def test_app_shows_navigation_sidebar_and_model_page() -> None:
    at = _app()
    at.run()
    _assert_clean(at)
    assert at.title[0].value == "Model & data"
    sidebar = " ".join(m.value for m in at.sidebar.markdown)
    assert "tiniest" in sidebar and "1-11, 1-12" in sidebar
    assert at.metric[0].label == "Test accuracy"
    assert float(at.metric[0].value.rstrip("%")) > 70


def test_layer_selection_is_seen_on_the_scores_page() -> None:
    at = _app()
    at.run()
    at.switch_page("views/layers.py").run()
    _assert_clean(at)
    at.button(key="pick_Each block").click().run()
    blocks = at.session_state["layers"]
    assert blocks == ["1-3", "1-4", "1-5", "1-8", "1-9", "1-10"]
    assert at.multiselect(key="layers_ms").value == blocks
    at.switch_page("views/scores.py").run()
    _assert_clean(at)
    assert at.multiselect(key="w.L.KNN").value == blocks  # rule "any": the whole selection
    assert at.multiselect(key="w.L.GradNorm").value == blocks  # blocks hold parameters
    # a per-score change sticks until the Layers page selection changes again
    at.multiselect(key="w.L.KNN").set_value(["1-11"]).run()
    at.switch_page("views/results.py").run()
    at.switch_page("views/scores.py").run()
    assert at.multiselect(key="w.L.KNN").value == ["1-11"]


def _small_run_state() -> dict[str, object]:
    return {
        "w.n_cal": 200,
        "w.n_test": 200,
        "w.scores": ["Softmax", "KNN"],
        "w.p.KNN.k": 5,
        "w.L.KNN": ["1-11"],
        "w.perts": ["vertical_flip"],
        "w.ood_bundled": ["mnist"],
    }


def test_run_matches_ood_core_eval_directly() -> None:
    from ood_core.data import load_bundled
    from ood_core.eval import compute_confidence, compute_metrics, fit_scores
    from ood_core.hub import load_model
    from ood_core.metrics import DEFAULT_METRICS
    from ood_core.perturbations import make_perturbation
    from ood_core.scores import KNN, Softmax

    at = _app(**_small_run_state())
    at.run()
    at.switch_page("views/scores.py").run()
    _assert_clean(at)
    at.button(key="run").click().run()
    _assert_clean(at)
    assert at.title[0].value == "Results"
    table = at.dataframe[0].value  # the metric table comes first
    result = at.session_state["result"]
    assert list(table.index) == ["Softmax()", "KNN(k=5) @ 1-11"]

    # the same computation, straight through ood_core.eval on the same subsets
    calib = load_bundled("fashion_mnist", "calibration").subset(200, 0)
    ind = load_bundled("fashion_mnist", "test").subset(200, 1)
    mnist = load_bundled("mnist", "test").subset(200, 2)
    assert np.array_equal(result.ind.images.numpy(), ind.images.numpy())
    net = load_model("bundled", "tiniest")
    fitted = fit_scores(
        [(Softmax(), []), (KNN(k=5), [(1, 11)])], net, calib.images, calib.labels, progress=False
    )
    oods = [make_perturbation("vertical_flip")(ind.images), mnist.images]
    confs_ind, confs_oods = compute_confidence(fitted, ind.images, oods, progress=False)
    evals = compute_metrics(confs_ind, confs_oods, list(DEFAULT_METRICS))
    titles = ["Vertical flip", "MNIST digits"]
    assert result.ood_titles == titles
    for j, title in enumerate(titles):
        for k, metric in enumerate(DEFAULT_METRICS):
            shown = table[f"{title} | {metric!r}"].to_numpy(dtype=float)
            np.testing.assert_allclose(shown, evals[:, j, k], rtol=1e-9, atol=1e-12)

    # view options recompute nothing: same result object, same fitted scores
    # (AppTest reruns the page it was told, not the one st.switch_page went to: go there)
    at.switch_page("views/results.py").run()
    cache = at.session_state["run_cache"]
    n_fitted = len(cache.fitted)
    at.selectbox(key="w.tbl_metric").set_value("AUC()").run()
    _open_tab(at, "Threshold explorer")
    at.radio(key="w.thr_mode").set_value("Raw threshold").run()
    _assert_clean(at)
    assert at.session_state["result"] is result and len(cache.fitted) == n_fitted
    _open_tab(at, "Overview")

    # changing one score's parameter refits only that score
    at.switch_page("views/scores.py").run()
    at.number_input(key="w.p.KNN.k").set_value(7).run()
    at.button(key="run").click().run()
    _assert_clean(at)
    assert len(cache.fitted) == n_fitted + 1
    new = at.session_state["result"]
    assert new.score_names[1] == "KNN(k=7) @ 1-11"
    np.testing.assert_array_equal(new.confs_ind[0], result.confs_ind[0])
    assert set(new.timings["score"]) == {"KNN(k=7)"}


def _open_tab(at: AppTest, name: str) -> None:
    """Open a Results tab (what a click on it does: the tabs are lazy, on_change="rerun")."""
    at.session_state["w.res_tab"] = name
    at.run()
    _assert_clean(at)


def test_results_tabs_render_with_a_result() -> None:
    state = _small_run_state() | {"w.L.KNN": ["1-8", "1-11"], "w.sweep.KNN": True, "w.n_boot": 20}
    at = _app(**state)
    at.run()  # once before switching (AppTest's rule)
    at.switch_page("views/results.py").run()
    _assert_clean(at)
    at.button(key="run_default").click().run()
    _assert_clean(at)
    result = at.session_state["result"]
    assert result.score_names == ["Softmax()", "KNN(k=5) @ 1-8", "KNN(k=5) @ 1-11"]
    table = at.dataframe[0].value
    ci = [c for c in table.columns if c.endswith(" CI")]
    assert len(ci) == 2 * 4 and table[ci[0]].str.match(r"\[0\.\d{3}, [01]\.\d{3}\]").all()
    assert len(at.get("plotly_chart")) == 3 + 2  # histograms and ROC curves: the open tab only
    assert not at.get("download_button")  # lazy tabs: the Export tab is not drawn until opened
    _open_tab(at, "Layers & timings")
    assert not [i for i in at.info if "several layer sets" in i.value]  # the sweep's heatmap
    _open_tab(at, "Export")
    labels = {b.label for b in at.get("download_button")}
    assert {
        "Metrics (CSV)",
        "Confidences (parquet)",
        "Report (HTML)",
        "Run config (TOML)",
    } <= labels
    for tab, set_one in (
        ("Gallery", lambda: at.selectbox(key="w.gal_score").set_value(1)),
        ("Threshold explorer", lambda: at.slider(key="w.thr_accept").set_value(0.8)),
        ("Layers & timings", lambda: at.selectbox(key="w.hm_ood").set_value(1)),
    ):
        _open_tab(at, tab)
        set_one().run()
        _assert_clean(at)
        assert at.session_state["w.res_tab"] == tab  # the open tab is kept across re-runs
    assert at.session_state["result"] is result


def test_offline_github_repo_shows_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import ood_core.hub

    monkeypatch.setattr(ood_core.hub, "network_available", lambda *a, **k: False)
    at = _app()
    at.run()
    at.radio(key="w.model_src").set_value("GitHub (torch.hub)").run()
    at.text_input(key="w.gh_repo").input("nobody/nothing").run()
    at.text_input(key="w.gh_entry").input("tiniest").run()
    at.checkbox(key="w.trust.nobody/nothing").check().run()  # trusted: the offline error shows
    at.button(key="load_model").click().run()
    assert not at.exception
    assert any("nobody/nothing" in e and "not reachable" in e for e in _errors(at)), _errors(at)
    assert at.text_input(key="w.gh_repo").value == "nobody/nothing"  # inputs stay
    assert at.session_state["model_entry"] == "tiniest"  # the current model is kept


def test_wrong_shape_dataset_shows_an_error(tmp_path: Path) -> None:
    path = tmp_path / "rgb32.npz"
    rng = np.random.default_rng(0)
    np.savez(
        path, images=rng.random((20, 3, 32, 32), dtype=np.float32), labels=rng.integers(0, 10, 20)
    )
    at = _app()
    at.run()
    at.radio(key="w.data_src").set_value("Local file").run()
    at.text_input(key="w.data_path").input(str(path)).run()
    at.button(key="load_data").click().run()
    assert not at.exception
    assert any("(3, 32, 32)" in e for e in _errors(at)), _errors(at)
    assert at.text_input(key="w.data_path").value == str(path)
    # a missing file is an error message too
    at.text_input(key="w.data_path").input(str(tmp_path / "nope.npz")).run()
    at.button(key="load_data").click().run()
    assert not at.exception
    assert any("No such file" in e for e in _errors(at)), _errors(at)


def test_invalid_score_parameters_show_errors_next_to_the_score() -> None:
    at = _app(**{"w.n_cal": 10, "w.p.KNN.k": 15})
    at.run()  # once before switching (AppTest's rule)
    at.switch_page("views/scores.py").run()
    assert not at.exception
    errors = _errors(at)
    assert any("k=15" in e and "10 calibration" in e for e in errors), errors
    assert at.button(key="run").disabled
    assert at.button(key="run_side").disabled  # the sidebar's Run (in reach while scrolled) too
    at.number_input(key="w.p.KNN.k").set_value(3).run()
    _assert_clean(at)
    assert not at.button(key="run").disabled and not at.button(key="run_side").disabled


def test_the_sidebar_run_runs_the_same_config(_run_store_dir: Path) -> None:
    at = _app(**_tiny_run_state())
    at.run()  # once before switching (AppTest's rule)
    at.switch_page("views/scores.py").run()
    at.button(key="run_side").click().run()
    _assert_clean(at)
    assert at.title[0].value == "Results" and at.session_state["run_status"] == "done"
    result = at.session_state["result"]
    assert result.score_names == ["Softmax()", "KNN(k=5) @ 1-11"]
    assert (result.config.n_calibration, result.config.n_test) == (100, 50)


def test_uploaded_config_is_parsed_or_explained():
    from ood_core.config import example_config
    from ood_lens_app.runs import parse_uploaded_config

    config, error = parse_uploaded_config(example_config().to_toml().encode())
    assert error is None and config == example_config()
    assert parse_uploaded_config(b"[model\n")[1].startswith("Invalid run config")
    assert "no scores" in parse_uploaded_config(b"[model]\nentry='tiniest'\n")[1]
    assert "not UTF-8" in parse_uploaded_config(b"\xff\xfe")[1]


# ============================================================================ issue 11: at a glance
# (appended by the "read at a glance / first screen / report" helper)
def test_first_screen_states_the_question_and_one_accuracy() -> None:
    at = _app()
    at.run()
    _assert_clean(at)
    text = " ".join(m.value for m in at.markdown)
    assert "Which confidence score" in text
    accuracies = [m for m in at.metric if "accuracy" in m.label.lower()]
    assert len(accuracies) == 1  # one accuracy figure, said what it is measured on
    captions = " ".join(c.value for c in at.caption)
    assert "test samples a run scores" in captions
    assert "accuracy" not in " ".join(str(o) for o in at.selectbox(key="w.bundled_entry").options)


def test_run_the_demo_lands_on_results_with_the_headline(monkeypatch: pytest.MonkeyPatch) -> None:
    from ood_core.config import example_config

    monkeypatch.setenv("OOD_LENS_DEFAULT_N", "150")
    at = _app()
    at.run()
    at.button(key="run_demo").click().run()
    _assert_clean(at)
    result = at.session_state["result"]
    assert len(result.score_names) == len(example_config().scores)
    assert len(result.ood_titles) == len(example_config().scenarios)
    assert len(result.ind) == 150
    assert at.title[0].value == "Results"
    head = at.table[0].value  # the headline: AUROC x scenarios + mean, before the full table
    assert list(head.columns) == [*result.ood_titles, "mean"]
    auc = result.frame[result.frame["metric"] == "AUC()"]
    first = auc[auc["ood"] == result.ood_titles[0]]["value"].iloc[0]
    assert head.iloc[0, 0] == f"{first:.3f}"
    full = at.dataframe[0].value
    assert len([c for c in full.columns if " | " in c]) == 4 * len(result.metrics)
    # the widgets now hold the demo's settings: no "settings changed" banner, its scores shown
    assert not any("settings changed" in w.value for w in at.warning)
    at.switch_page("views/scores.py").run()
    _assert_clean(at)
    assert at.multiselect(key="w.scores").value == [s.name for s in example_config().scores]


# ==================================================================================================
# Issue 11, runs persist and honest state: every Run saved to the run store (OOD_LENS_RUNS, a
# temporary folder here) and named in the URL; ?run=ID restores the result and every widget; the
# Results page says when the settings changed; a run cut short is reported as cancelled.
# ==================================================================================================
@pytest.fixture(autouse=True)
def _run_store_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OOD_LENS_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


def _tiny_run_state() -> dict[str, object]:
    return {
        "w.n_cal": 100,
        "w.n_test": 50,
        "w.scores": ["Softmax", "KNN"],
        "w.p.KNN.k": 5,
        "layers": ["1-11"],
        "w.perts": ["vertical_flip"],
        "w.ood_bundled": [],
    }


def _query_run(at: AppTest) -> str | None:
    value = at.query_params.get("run")
    return value[0] if isinstance(value, list) else value


def _warnings(at: AppTest) -> list[str]:
    return [w.value for w in at.warning]


def _saved_run(run_store_dir: Path) -> tuple[str, AppTest]:
    at = _app(**_tiny_run_state())
    at.run()  # once before switching (AppTest's rule)
    at.switch_page("views/scores.py").run()
    _assert_clean(at)
    at.button(key="run").click().run()
    _assert_clean(at)
    run_id = _query_run(at)
    assert run_id and at.session_state["run_id"] == run_id
    run_store.wait_pending()  # the bundle is written in the background, run.json last
    assert (run_store_dir / run_id / "run.json").is_file()
    return run_id, at


def test_a_run_is_saved_and_named_in_the_url(_run_store_dir: Path) -> None:
    run_id, at = _saved_run(_run_store_dir)
    assert at.session_state["run_status"] == "done"
    # while it ran the URL named it (?pending=TOKEN, for a reload meanwhile); now it is over
    from ood_lens_app import in_flight

    assert in_flight.URL_KEY not in at.query_params
    entry = in_flight.lookup(at.session_state["own_pending"])
    assert entry is not None and (entry["status"], entry["run_id"]) == ("done", run_id)
    at.switch_page("views/runs.py").run()
    _assert_clean(at)
    assert at.title[0].value == "Runs"
    assert run_id in list(at.dataframe[0].value["id"])
    # Open in a new session restores it; Delete removes it
    other = _app()
    other.run()  # once before switching (AppTest's rule)
    other.switch_page("views/runs.py").run()
    _assert_clean(other)
    other.button(key="runs_open").click().run()
    _assert_clean(other)
    assert other.session_state["run_id"] == run_id
    assert other.session_state["result"].score_names == ["Softmax()", "KNN(k=5) @ 1-11"]
    assert other.session_state["w.scores"] == ["Softmax", "KNN"]
    other.switch_page("views/runs.py").run()
    other.text_input(key="runs_name").input("k=5 trial").run()  # a run can be named
    _assert_clean(other)
    assert run_store.run_names(_run_store_dir) == {run_id: "k=5 trial"}
    assert list(other.dataframe[0].value["name"]) == ["k=5 trial"]
    other.button(key="runs_delete").click().run()  # asks first: nothing deleted yet
    _assert_clean(other)
    assert (_run_store_dir / run_id).is_dir()
    assert any("Delete the run of" in w.value for w in other.warning)
    other.button(key="runs_delete_no").click().run()  # Cancel
    assert (_run_store_dir / run_id).is_dir() and not other.warning
    other.button(key="runs_delete").click().run()
    other.button(key="runs_delete_yes").click().run()
    _assert_clean(other)
    assert not (_run_store_dir / run_id).exists() and other.session_state["run_id"] is None
    assert any("No saved runs" in i.value for i in other.info)
    assert any(f"Deleted run {run_id}" in m.value for m in other.success)
    other.button(key="runs_undo_btn").click().run()  # undone: the run is back, whole
    _assert_clean(other)
    assert run_store.exists(_run_store_dir, run_id)
    assert run_id in list(other.dataframe[0].value["id"])
    other.button(key="runs_delete").click().run()
    other.button(key="runs_delete_yes").click().run()
    assert not (_run_store_dir / run_id).exists()


def test_url_with_a_run_id_restores_the_result_and_every_widget(_run_store_dir: Path) -> None:
    run_id, first = _saved_run(_run_store_dir)
    shown = first.session_state["result"]
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)  # a new session: a reload
    at.query_params["run"] = run_id
    at.run()  # the app script first (st.navigation), as a browser loading the URL does
    at.switch_page("views/results.py").run()
    _assert_clean(at)
    result = at.session_state["result"]
    assert result is not None and at.session_state["run_id"] == run_id
    assert result.score_names == shown.score_names == ["Softmax()", "KNN(k=5) @ 1-11"]
    np.testing.assert_allclose(result.frame["value"], shown.frame["value"])
    # read back from the bundle, not recomputed: nothing fitted in this session
    assert result.restored_from and result.restored_from.endswith(run_id)
    assert not at.session_state["run_cache"].fitted
    np.testing.assert_array_equal(result.confs_ind, shown.confs_ind)
    np.testing.assert_array_equal(result.ind_predictions, shown.ind_predictions)
    for tab in ("Threshold explorer", "Gallery", "Layers & timings", "Export", "Overview"):
        _open_tab(at, tab)  # every tab draws from the read-back result
    assert at.session_state["result"] is result
    assert at.session_state["w.n_cal"] == 100 and at.session_state["w.n_test"] == 50
    assert not any("settings changed" in w for w in _warnings(at))
    at.switch_page("views/scores.py").run()
    _assert_clean(at)
    assert at.multiselect(key="w.scores").value == ["Softmax", "KNN"]
    assert at.number_input(key="w.p.KNN.k").value == 5
    assert at.multiselect(key="w.L.KNN").value == ["1-11"]
    assert at.multiselect(key="w.perts").value == ["vertical_flip"]
    assert at.multiselect(key="w.ood_bundled").value == []


def _query(at: AppTest, key: str) -> str | None:
    value = at.query_params.get(key)
    return value[0] if isinstance(value, list) else value


def test_the_results_view_is_in_the_url_and_a_reload_reopens_it(_run_store_dir: Path) -> None:
    """Tab, explorer score, mode and acceptance go into the URL beside ``run``; a new session
    (F5) on that URL opens the same view; invalid values are ignored."""
    run_id, at = _saved_run(_run_store_dir)
    at.switch_page("views/results.py").run()
    _open_tab(at, "Threshold explorer")
    at.selectbox(key="w.thr_score").set_value(1).run()
    at.slider(key="w.thr_accept").set_value(0.9).run()
    _assert_clean(at)
    assert _query(at, "run") == run_id and _query(at, "tab") == "Threshold explorer"
    assert _query(at, "score") == "KNN(k=5) @ 1-11"
    assert (_query(at, "mode"), _query(at, "accept")) == ("accept", "0.9")

    again = AppTest.from_file(APP, default_timeout=TIMEOUT)  # the reload
    for key in ("run", "tab", "score", "mode", "accept"):
        again.query_params[key] = _query(at, key)
    again.run()
    again.switch_page("views/results.py").run()
    _assert_clean(again)
    assert again.session_state["w.res_tab"] == "Threshold explorer"
    assert again.session_state["w.thr_score"] == 1
    assert again.session_state["w.thr_accept"] == 0.9
    assert again.slider(key="w.thr_accept").value == 0.9  # the explorer is drawn with it

    bad = AppTest.from_file(APP, default_timeout=TIMEOUT)
    bad.query_params.update(run=run_id, tab="Nope", score="Gone()", accept="7", mode="x")
    bad.run()
    bad.switch_page("views/results.py").run()
    _assert_clean(bad)
    assert bad.session_state["w.res_tab"] == "Overview"
    assert bad.session_state["w.thr_accept"] == 0.95 and bad.session_state["w.thr_score"] == 0
    assert _query(bad, "tab") == "Overview" and _query(bad, "accept") == "0.95"


def test_banner_after_a_settings_change_and_its_run(_run_store_dir: Path) -> None:
    run_id, at = _saved_run(_run_store_dir)
    at.switch_page("views/results.py").run()
    assert not any("settings changed" in w for w in _warnings(at))
    at.switch_page("views/scores.py").run()
    at.number_input(key="w.p.KNN.k").set_value(7).run()
    at.switch_page("views/results.py").run()
    _assert_clean(at)
    assert any("settings changed" in w for w in _warnings(at)), _warnings(at)
    at.button(key="stale_run").click().run()
    _assert_clean(at)
    assert "KNN(k=7) @ 1-11" in at.session_state["result"].score_names
    assert not any("settings changed" in w for w in _warnings(at))
    assert _query_run(at) not in (None, run_id)


def test_a_run_cut_short_is_reported_as_cancelled() -> None:
    at = _app(run_status="running", run_started="12:00:00")
    at.run()  # once before switching (AppTest's rule)
    at.switch_page("views/results.py").run()
    assert at.session_state["run_status"] == "cancelled"
    assert any("was cancelled" in w for w in _warnings(at)), _warnings(at)
    at.button(key="dismiss_cancelled").click().run()
    assert at.session_state["run_status"] is None
    assert not any("was cancelled" in w for w in _warnings(at))


def test_a_url_naming_no_saved_run_says_so() -> None:
    for bad in ("20200101-000000-abcdef", "../etc"):
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        at.query_params["run"] = bad
        at.run()
        assert not at.exception
        assert any("Cannot open saved run" in e for e in _errors(at)), _errors(at)
        assert at.session_state["result"] is None


def test_editing_a_score_parameter_keeps_its_panel_open() -> None:
    at = _app(**{"w.scores": ["Softmax", "KNN"]})
    at.run()  # once before switching (AppTest's rule)
    at.switch_page("views/scores.py").run()
    _assert_clean(at)

    def panel(name: str) -> object:
        return next(e for e in at.expander if e.label.startswith(f"**{name}**"))

    assert not panel("KNN").proto.expanded
    at.number_input(key="w.p.KNN.k").set_value(7).run()
    _assert_clean(at)
    assert "k=7" in panel("KNN").label  # the title changed ...
    assert panel("KNN").proto.expanded  # ... and the panel stayed open
    assert not panel("Softmax").proto.expanded
    at.multiselect(key="w.L.KNN").set_value(["1-11"]).run()
    assert panel("KNN").proto.expanded


def test_layer_table_depth_filter_and_selected_only() -> None:
    at = _app()
    at.run()  # once before switching (AppTest's rule)
    at.switch_page("views/layers.py").run()
    _assert_clean(at)
    every = list(at.dataframe[0].value["id"])
    at.multiselect(key="layers_depths").set_value([0]).run()
    _assert_clean(at)
    shown = list(at.dataframe[0].value["id"])
    assert shown and all(i.startswith("0-") for i in shown) and len(shown) < len(every)
    at.multiselect(key="layers_depths").set_value([]).run()
    assert list(at.dataframe[0].value["id"]) == every
    at.toggle(key="layers_selected_only").set_value(True).run()
    _assert_clean(at)
    selected = list(at.session_state["layers"])
    assert list(at.dataframe[0].value["id"]) == selected and 0 < len(selected) < len(every)


def test_warnings_sit_in_one_collapsed_panel_grouped_per_score() -> None:
    """A degenerate fit (DeepMahalanobis on 30 samples of an 80-d layer) is said in one
    collapsed panel under the run's summary line, grouped by score, not as banners above it."""
    state = _tiny_run_state() | {"w.scores": ["Softmax", "DeepMahalanobis"], "w.n_cal": 30}
    at = _app(**state)
    at.run()  # once before switching (AppTest's rule)
    at.switch_page("views/scores.py").run()
    at.button(key="run").click().run()
    _assert_clean(at)
    result = at.session_state["result"]
    assert any(m.startswith("DeepMahalanobis @ 1-11: ") for m in result.warnings), result.warnings
    at.switch_page("views/results.py").run()
    _assert_clean(at)
    assert not _warnings(at)  # no banner per warning
    panels = [e for e in at.expander if "warning" in e.label]
    assert len(panels) == 1 and "about DeepMahalanobis" in panels[0].label
    text = " ".join(m.value for m in panels[0].markdown)
    assert (
        "**DeepMahalanobis**" in text and "- @ 1-11: 80 feature dimensions for 30 samples" in text
    )


def test_a_parameter_sweep_runs_once_and_the_study_tab_names_the_best() -> None:
    """KNN swept over k in {3, 5, 9} and DeepMahalanobis over two layers in one Run: the Study
    tab draws both sweeps and ranks them, with the best value of each."""
    state = _tiny_run_state() | {
        "w.scores": ["Softmax", "KNN", "DeepMahalanobis"],
        "layers": ["1-5", "1-11"],
        "w.psweep.KNN": "k",
        "w.psweepv.KNN": "3, 5, 9",
        "w.sweep.DeepMahalanobis": True,
    }
    at = _app(**state)
    at.run()  # once before switching (AppTest's rule)
    at.switch_page("views/scores.py").run()
    _assert_clean(at)
    at.button(key="run").click().run()
    _assert_clean(at)
    result = at.session_state["result"]
    assert result.score_names == [
        "Softmax()",
        "KNN(k=3) @ 1-5, 1-11",
        "KNN(k=5) @ 1-5, 1-11",
        "KNN(k=9) @ 1-5, 1-11",
        "DeepMahalanobis() @ 1-5",
        "DeepMahalanobis() @ 1-11",
    ]
    at.session_state["w.res_tab"] = "Study"
    at.switch_page("views/results.py").run()
    _assert_clean(at)
    ranking = next(d.value for d in at.dataframe if "margin over the next" in d.value.columns)
    assert set(ranking["score"]) == {"KNN", "DeepMahalanobis"}
    expected = result.frame[result.frame["metric"] == "AUC()"]
    knn = expected[expected["score"].str.startswith("KNN")].groupby("score")["value"].mean()
    best_k = knn.idxmax().split("=")[1].rstrip(")")
    row = ranking[ranking["score"] == "KNN"].iloc[0]
    assert row["best"] == best_k and row["value"] == f"{knn.max():.3f}"  # shown to 3 decimals


def test_a_sweep_turns_bootstrap_intervals_on_and_says_so() -> None:
    state = _tiny_run_state() | {"layers": ["1-5", "1-11"], "w.n_boot": 0}
    at = _app(**state)
    at.run()  # once before switching (AppTest's rule)
    at.switch_page("views/scores.py").run()
    _assert_clean(at)
    at.checkbox(key="w.sweep.KNN").check().run()
    _assert_clean(at)
    assert at.session_state["w.n_boot"] == 200
    assert any("bootstrap intervals were turned on" in c.value for c in at.caption)
    at.number_input(key="w.n_boot").set_value(0).run()  # the user may turn them off again
    at.selectbox(key="w.psweep.KNN").select("k").run()
    assert at.session_state["w.n_boot"] == 200  # another sweep edit: on again, said again
    at.number_input(key="w.n_boot").set_value(50).run()
    at.checkbox(key="w.sweep.KNN").uncheck().run()
    assert at.session_state["w.n_boot"] == 50  # a chosen number is never overridden
