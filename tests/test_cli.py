"""CLI: example config round trip, a run with --out, and an offline self-contained report."""

from __future__ import annotations

import hashlib
import json
import re

import pandas as pd
import pytest

from ood_core.cli import main
from ood_core.pipeline import RunConfig, ScenarioSpec, ScoreSpec, example_config


def test_example_config_round_trips_through_toml(capsys):
    assert main(["example-config"]) == 0
    text = capsys.readouterr().out
    cfg = RunConfig.from_toml(text)
    assert cfg == example_config()
    assert cfg.scores[3] == ScoreSpec("KNN", {"k": 15}, ["1-11"])


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match=r"Unknown section\(s\) \['modle'\]"):
        RunConfig.from_toml("[modle]\nrepo='bundled'\n")
    with pytest.raises(ValueError, match="either a perturbation"):
        ScenarioSpec()


@pytest.mark.slow
def test_run_writes_bundle_and_offline_report(tmp_path, capsys):
    cfg = example_config()
    cfg.n_calibration, cfg.n_test = 300, 200
    cfg.scores = [ScoreSpec("Softmax"), ScoreSpec("KNN", {"k": 5}, ["1-11"])]
    cfg.scenarios = [ScenarioSpec(kind="vertical_flip"), ScenarioSpec(dataset="mnist")]
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml())
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Evaluation of 2 scores against 2 OoD sets and 4 metrics" in out
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert len(metrics) == 2 * 2 * 4 and metrics["value"].between(0, 1).all()
    confs = pd.read_parquet(tmp_path / "out" / "confidences.parquet")
    assert len(confs) == 2 * (200 + 200 + 200)
    assert RunConfig.from_toml((tmp_path / "out" / "config.toml").read_text()) == cfg
    html = (tmp_path / "out" / "report.html").read_text()
    assert not re.search(r"<script[^>]+src=[\"']https?:", html)  # plotly.js is inlined
    assert not re.search(r"<link[^>]+href=[\"']https?:", html)  # no external stylesheets
    assert "Plotly.newPlot" in html and len(html) > 3_000_000  # the plotly.js bundle is inside
    n_figures = 1 + 2 + 2  # summary + a histogram per score + a ROC per scenario
    assert len(re.findall(r'<div id="figure-\d+" class="plotly-graph-div"', html)) == n_figures
    info = json.loads((tmp_path / "out" / "run.json").read_text())  # the completion marker
    assert info["status"] == "complete" and info["warnings"] == [] and info["notes"] == []
    assert info["config_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run.toml"]  # no temp folder


def test_missing_config_file_is_an_error(capsys):
    assert main(["run", "nope.toml"]) == 2
    assert "no such config file" in capsys.readouterr().err


@pytest.mark.slow
def test_run_prints_degenerate_warnings_and_reports_them(tmp_path, capsys):
    cfg = example_config()
    cfg.n_calibration, cfg.n_test = 200, 100
    cfg.scores = [ScoreSpec("Energy", {"mode": "diff"}), ScoreSpec("Softmax")]
    cfg.scenarios = [ScenarioSpec(kind="vertical_flip")]
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml())
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: Energy: all 100 confidences on") == 2  # InD and the flipped set
    assert "Softmax" not in err
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<h2>Warnings</h2>" in html and "Energy: all 100 confidences on" in html
