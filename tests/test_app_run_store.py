"""The dashboard's run store (save / list / open / delete / compare a real small run) and the
settings a config puts into the widgets (replay) and compares by."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ood_core import plots
from ood_core.config import RunConfig, ScenarioSpec, ScoreSpec, example_config
from ood_core.runner import RunResult, run
from ood_lens_app import compare, form, run_store, runs, state


def _small_config(**changes: object) -> RunConfig:
    cfg = dataclasses.replace(
        example_config(),
        n_calibration=100,
        n_test=50,
        scores=[ScoreSpec("Softmax", {}, [])],
        scenarios=[ScenarioSpec(kind="vertical_flip")],
    )
    return dataclasses.replace(cfg, **changes)


@pytest.fixture(scope="module")
def small_result() -> RunResult:
    return run(_small_config())


def test_runs_dir_from_env(tmp_path: Path) -> None:
    assert run_store.runs_dir({"OOD_LENS_RUNS": str(tmp_path)}) == tmp_path
    assert run_store.runs_dir({}) == Path.home() / ".cache" / "ood-lens" / "runs"


def test_save_list_open_delete_round_trip(small_result: RunResult, tmp_path: Path) -> None:
    run_id = run_store.save(small_result, tmp_path)
    assert run_store.is_run_id(run_id) and run_store.exists(tmp_path, run_id)
    assert {p.name for p in (tmp_path / run_id).iterdir()} >= {
        "config.toml",
        "metrics.csv",
        "confidences.parquet",
        "report.html",
        "run.json",
    }
    table = run_store.list_runs(tmp_path)
    assert list(table["id"]) == [run_id]
    row = table.iloc[0]
    assert row["model"] == "tiniest (bundled)" and row["scores"] == "Softmax()"
    assert row["scenarios"] == "Vertical flip" and row["data"] == "fashion_mnist · 100 / 50"
    auroc = small_result.frame.loc[small_result.frame["metric"] == "AUC()", "value"].mean()
    assert row["AUROC (mean)"] == pytest.approx(auroc)

    stored = run_store.load(tmp_path, run_id)
    assert stored.config == small_result.config
    assert stored.metrics[["score", "layers", "ood", "metric"]].equals(
        small_result.frame[["score", "layers", "ood", "metric"]]
    )
    assert stored.metrics["value"].to_numpy() == pytest.approx(small_result.frame["value"])
    assert len(stored.confidences) == len(small_result.confidences_frame())
    assert stored.info["status"] == "complete" or "status" in stored.info

    assert run_store.delete(tmp_path, run_id) and not run_store.exists(tmp_path, run_id)
    assert run_store.list_runs(tmp_path).empty
    assert not run_store.delete(tmp_path, run_id)
    with pytest.raises(FileNotFoundError):
        run_store.load(tmp_path, run_id)


def test_the_store_keeps_the_newest_runs(small_result: RunResult, tmp_path: Path) -> None:
    ids = [run_store.save(small_result, tmp_path, keep=2) for _ in range(3)]
    assert sorted(run_store.list_runs(tmp_path)["id"]) == sorted(ids)[1:]
    assert run_store.keep_count({"OOD_LENS_RUNS_KEEP": "7"}) == 7
    assert run_store.keep_count({"OOD_LENS_RUNS_KEEP": "x"}) == run_store.KEEP


def test_ids_are_never_paths(tmp_path: Path) -> None:
    for bad in ("../x", "/etc", "", "20260101-120000-ABCDEF"):
        assert not run_store.is_run_id(bad)
        with pytest.raises(ValueError):
            run_store.delete(tmp_path, bad)
    assert run_store.when_text("20260102-030405-abcdef") == "2026-01-02 03:04:05"


def test_compare_two_runs(small_result: RunResult, tmp_path: Path) -> None:
    a = run_store.load(tmp_path, run_store.save(small_result, tmp_path))
    other = run(_small_config(n_calibration=60))
    b = run_store.load(tmp_path, run_store.save(other, tmp_path))
    assert a.run_id != b.run_id and len(run_store.list_runs(tmp_path)) == 2
    diff = compare.compare(a.metrics, b.metrics)
    assert list(diff.columns) == compare.COLUMNS
    assert len(diff) == len(small_result.frame)
    assert (diff["B - A"] == diff["B"] - diff["A"]).all()
    assert set(diff["setting"]) == {"Softmax()"} and set(diff["score"]) == {"Softmax"}
    assert compare.config_changes(a.config, b.config) == ["data.n_calibration: 100 → 60"]
    assert compare.config_changes(a.config, a.config) == []
    assert compare.common_scenarios(a.confidences, b.confidences) == ["Vertical flip"]
    curves, ids = compare.roc_inputs({"A": a.confidences, "B": b.confidences}, "Vertical flip")
    assert list(curves) == ["A · Softmax()", "B · Softmax()"]
    assert all(len(ind) == 50 and len(ood) == 50 for ind, ood in curves.values())
    fig = plots.roc_figure(curves)
    assert {t.name for t in fig.data} >= set(curves)
    colors, dashes = compare.roc_styles(ids)
    assert colors["A · Softmax()"] == colors["B · Softmax()"]  # colour = score, dash = run
    assert dashes == {"A · Softmax()": "solid", "B · Softmax()": "dash"}
    styled = plots.roc_figure(curves, colors=colors, dashes=dashes)
    lines = {t.name: t.line for t in styled.data if t.name in curves}
    assert lines["B · Softmax()"].dash == "dash" and lines["A · Softmax()"].dash == "solid"


def _metrics(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    """A metric frame of ``(score, layers, AUROC)`` rows on one OoD set."""
    return pd.DataFrame(
        [
            {"score": s, "layers": layers or np.nan, "ood": "F", "metric": "AUC()", "value": v}
            for s, layers, v in rows
        ]
    )


def test_compare_pairs_a_score_whose_parameter_changed() -> None:
    """KNN(k=15) in A and KNN(k=50) in B are one score: B - A, not "not in A" / "not in B"."""
    a = _metrics(
        [("Softmax()", "", 0.7), ("KNN(k=15)", "1-11", 0.80), ("DeepMahalanobis()", "1-3", 0.5)]
    )
    b = _metrics(
        [
            ("Softmax()", "", 0.7),
            ("KNN(k=50)", "1-11", 0.85),
            ("DeepMahalanobis(pooling='mean')", "1-3", 0.95),
        ]
    )
    diff = compare.compare(a, b)
    assert list(diff["score"]) == ["Softmax", "KNN", "DeepMahalanobis"]
    assert list(diff["setting"]) == [
        "Softmax()",
        "KNN(k=15) → KNN(k=50)",
        "DeepMahalanobis() → DeepMahalanobis(pooling='mean')",
    ]
    np.testing.assert_allclose(diff["B - A"], [0.0, 0.05, 0.45], atol=1e-12)
    assert list(diff["changed"]) == [False, True, True]
    assert "not in" not in compare.compare_text(diff).to_string()


def test_compare_orders_layers_as_the_network_and_pairs_sweeps_by_position() -> None:
    a = _metrics(
        [
            ("KNN(k=5)", "1-10", 0.6),
            ("KNN(k=5)", "1-3", 0.7),
            ("KNN(k=7)", "1-3", 0.71),
            ("Energy()", "", 0.5),
        ]
    )
    b = _metrics([("KNN(k=5)", "1-3", 0.75), ("KNN(k=5)", "1-10", 0.6), ("KNN(k=9)", "1-3", 0.8)])
    diff = compare.compare(a, b)
    assert list(zip(diff["score"], diff["layers"], strict=True)) == [
        ("KNN", "1-3"),
        ("KNN #2", "1-3"),  # the second KNN @ 1-3 of each run (a sweep), paired by position
        ("KNN", "1-10"),  # 1-3 before 1-10: network order, not text order
        ("Energy", ""),
    ]
    np.testing.assert_allclose(diff["A"], [0.7, 0.71, 0.6, 0.5])
    np.testing.assert_allclose(diff["B"].iloc[:3], [0.75, 0.8, 0.6])
    assert diff["B"].isna().iloc[3] and list(diff["changed"]) == [True, True, False, True]
    text = compare.compare_text(diff)
    assert list(text["B"]) == ["0.750", "0.800", "0.600", "not in B"]
    assert list(text["B - A"]) == ["+0.050", "+0.090", "+0.000", "-"]
    assert "None" not in text.to_string() and "nan" not in text.to_string()
    assert compare.layer_order("1-5, 1-11") < compare.layer_order("1-11")


def test_config_changes_name_each_parameter_and_each_score_only_one_run_has() -> None:
    base = _small_config(scores=[ScoreSpec("Softmax"), ScoreSpec("KNN", {"k": 15}, ["1-11"])])
    other = dataclasses.replace(
        base,
        seed=3,
        scores=[
            ScoreSpec("Softmax"),
            ScoreSpec("KNN", {"k": 50, "act_norm": False}, ["1-11"]),
            ScoreSpec("KNN", {}, ["1-5"]),
        ],
    )
    assert compare.config_changes(base, other) == [
        "data.seed: 0 → 3",
        "KNN @ 1-11: k 15 → 50",
        "KNN @ 1-11: act_norm default → false",
        "only in B: KNN @ 1-5",
    ]


def test_roc_colours_follow_the_score_identity_across_runs() -> None:
    def conf(score: str) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "score": [score] * 4,
                "dataset": ["InD", "InD", "F", "F"],
                "sample": [0, 1, 0, 1],
                "confidence": [0.9, 0.8, 0.1, 0.2],
            }
        )

    runs = {
        "A": pd.concat([conf("Softmax()"), conf("KNN(k=15) @ 1-11")]),
        "B": pd.concat([conf("Softmax()"), conf("KNN(k=50) @ 1-11")]),
    }
    curves, ids = compare.roc_inputs(runs, "F")
    assert ids == {
        "A · Softmax()": "Softmax",
        "A · KNN(k=15) @ 1-11": "KNN @ 1-11",
        "B · Softmax()": "Softmax",
        "B · KNN(k=50) @ 1-11": "KNN @ 1-11",
    }
    colors, _ = compare.roc_styles(ids)
    assert colors["A · KNN(k=15) @ 1-11"] == colors["B · KNN(k=50) @ 1-11"]
    assert colors["A · Softmax()"] != colors["A · KNN(k=15) @ 1-11"]


def test_apply_config_puts_every_setting_into_the_widgets() -> None:
    cfg = RunConfig.from_toml(
        """
[model]
repo = "bundled"
entry = "tiniest"
[data]
ind_dataset = "fashion_mnist"
n_calibration = 123
n_test = 45
[evaluation]
metrics = ["AUC()"]
n_boot = 7
baseline = 1
[[scores]]
name = "Softmax"
[[scores]]
name = "KNN"
layers = ["1-10"]
params = { k = 3, act_norm = 1.0 }
[[scores]]
name = "KNN"
layers = ["1-11"]
params = { k = 3, act_norm = 1.0 }
[[scenarios]]
kind = "darker"
params = { factor = 0.25 }
[[scenarios]]
dataset = "mnist"
"""
    )
    ss: dict = {}
    state.init_state(ss)
    ss["w.p.KNN.mode"] = "diff"  # an earlier edit the replay must undo
    ss["w.metric_custom"] = "MCC()"
    runs.apply_config(ss, cfg)
    assert ss["w.scores"] == ["Softmax", "KNN"]
    assert ss["w.L.KNN"] == ["1-10", "1-11"] and ss["w.sweep.KNN"] is True
    assert ss["w.p.KNN.k"] == 3 and ss["w.p.KNN.mode"] == "raw"
    assert ss["w.p.KNN.act_norm.none"] is False and ss["w.p.KNN.act_norm"] == 1.0
    assert ss["w.perts"] == ["darker"] and ss["w.p.pert:darker.factor"] == 0.25
    assert ss["w.ood_bundled"] == ["mnist"]
    assert (ss["w.n_cal"], ss["w.n_test"], ss["w.n_boot"]) == (123, 45, 7)
    assert ss["w.metrics"] == ["AUC()"] and ss["w.metric_custom"] == ""
    assert ss["w.baseline"] == "KNN"
    assert ss["layers"] == ["1-10", "1-11"]


def test_same_settings_ignores_spelling_only() -> None:
    cfg = _small_config()
    assert runs.same_settings(cfg, dataclasses.replace(cfg))
    explicit = dataclasses.replace(cfg, scores=[ScoreSpec("Softmax", {"mode": "raw"}, [])])
    assert runs.same_settings(cfg, explicit)
    assert not runs.same_settings(cfg, dataclasses.replace(cfg, n_test=51))
    assert not runs.same_settings(cfg, None)


def test_sync_url_restores_or_names_the_run() -> None:
    params: dict = {}
    assert runs.sync_url({"run_id": "a"}, params) is None and params == {"run": "a"}
    assert runs.sync_url({"run_id": "a"}, {"run": "b"}) == "b"
    assert runs.sync_url({"run_id": None, "restore_tried": "b"}, {"run": "b"}) is None
    assert form.n_samples(None) is None  # the form module imports alongside runs


def test_background_save_appears_complete_or_not_at_all(tmp_path, small_result):
    """A Run shows at once and its bundle is written in a thread; readers wait for it."""
    run_id = run_store.save(small_result, tmp_path, background=True)
    run_store.wait_pending()
    assert (tmp_path / run_id / "run.json").is_file()
    assert run_id in run_store.list_runs(tmp_path)["id"].tolist()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


# ==================================================================================================
# Issue 15: a run the store could not save is said so on the page ("not saved: <reason>; set
# OOD_LENS_RUNS to a writable folder"), never "Saved as", and the URL never names it.
# ==================================================================================================
def _failing_store(how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import errno
    import os

    from ood_core import outdir

    if how == "under-a-regular-file":
        (tmp_path / "afile").write_text("x")
        root = tmp_path / "afile" / "runs"
    elif how == "proc":
        root = Path("/proc/ood-lens-test/runs")
    else:  # a full disk while the bundle is written in the background
        root = tmp_path / "runs"
        write = outdir._write_new

        def full(path: Path, data: bytes) -> None:
            if path.name == "confidences.parquet":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            write(path, data)

        monkeypatch.setattr(outdir, "_write_new", full)
    monkeypatch.setenv("OOD_LENS_RUNS", str(root))
    return root


@pytest.mark.parametrize("how", ["under-a-regular-file", "proc", "full-disk"])
def test_the_page_says_a_run_was_not_saved(how: str, tmp_path: Path, monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    root = _failing_store(how, tmp_path, monkeypatch)
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=180)
    for key, value in {
        "w.n_cal": 100,
        "w.n_test": 50,
        "w.scores": ["Softmax"],
        "w.perts": ["vertical_flip"],
        "w.ood_bundled": [],
    }.items():
        at.session_state[key] = value
    at.run()  # once before switching (AppTest's rule)
    at.switch_page("views/scores.py").run()
    at.button(key="run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    at.switch_page("views/results.py").run()  # where the Run leads (AppTest does not follow)
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["result"] is not None  # the result is shown all the same
    said = [w.value for w in at.warning]
    assert any("not saved" in w and "set OOD_LENS_RUNS to a writable folder" in w for w in said)
    assert any("not saved" in w.value for w in at.sidebar.warning)
    sidebar = " ".join(m.value for m in at.sidebar.markdown)
    assert "Saved as" not in sidebar and "Saving as" not in sidebar
    assert at.session_state["run_id"] is None and not at.query_params.get("run")
    assert not (root.is_dir() and [p for p in root.iterdir() if run_store.is_run_id(p.name)])
    if how == "full-disk":
        assert "No space left on device" in " ".join(said)
        assert list(root.iterdir()) == []  # no half-written run left either


def test_a_deleted_run_can_be_restored_until_the_trash_is_emptied(
    small_result: RunResult, tmp_path: Path
) -> None:
    a, b = run_store.save(small_result, tmp_path), run_store.save(small_result, tmp_path)
    assert run_store.trash(tmp_path, a) and not run_store.exists(tmp_path, a)
    assert list(run_store.list_runs(tmp_path)["id"]) == [b]  # the trash is not listed
    assert run_store.restore(tmp_path, a) and run_store.exists(tmp_path, a)
    assert run_store.load(tmp_path, a).config == small_result.config  # back whole
    assert run_store.trash(tmp_path, a) and run_store.trash(tmp_path, b)
    assert run_store.empty_trash(tmp_path, keep=b) == [a]
    assert not run_store.restore(tmp_path, a) and run_store.restore(tmp_path, b)
    assert not run_store.trash(tmp_path, a)  # gone for good
    with pytest.raises(ValueError):
        run_store.restore(tmp_path, "../x")


def test_runs_can_be_named_and_names_follow_the_runs(
    small_result: RunResult, tmp_path: Path
) -> None:
    a, b = run_store.save(small_result, tmp_path), run_store.save(small_result, tmp_path)
    assert run_store.set_name(tmp_path, a, "  baseline\u200b for\nthe  review ") == (
        "baseline for the review"  # invisible and control characters dropped, spaces collapsed
    )
    assert run_store.set_name(tmp_path, b, "x" * 200) == "x" * run_store.MAX_NAME
    table = run_store.list_runs(tmp_path).set_index("id")
    assert table.loc[a, "name"] == "baseline for the review" and len(table.loc[b, "name"]) == 80
    assert sorted(p.name for p in (tmp_path / a).iterdir()) == sorted(
        p.name for p in (tmp_path / b).iterdir()
    )  # the bundle itself is unchanged: names live beside the runs
    assert run_store.set_name(tmp_path, b, "") == "" and b not in run_store.run_names(tmp_path)
    run_store.trash(tmp_path, a)
    assert run_store.run_names(tmp_path) == {a: "baseline for the review"}  # undoable: kept
    run_store.empty_trash(tmp_path)
    assert run_store.run_names(tmp_path) == {}
    with pytest.raises(FileNotFoundError):
        run_store.set_name(tmp_path, a, "gone")
    (tmp_path / run_store.NAMES).write_text("not json")
    assert run_store.run_names(tmp_path) == {}  # an unreadable names file names nothing
