"""CLI: example config round trip, a run with --out, and an offline self-contained report."""

from __future__ import annotations

import hashlib
import json
import re

import pandas as pd
import pytest

from ood_core.cli import main
from ood_core.config import RunConfig, ScenarioSpec, ScoreSpec, example_config
from ood_core.operating_points import operating_point_table


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
    n_passing = len(re.findall(r"<h2 id='s\d+'>Passing undetected at 95% InD", html))
    assert 1 <= n_passing <= 2  # one image grid per score that lets an OoD image through
    found = re.findall(r'<div id="figure-\d+" class="plotly-graph-div"', html)
    assert len(found) == n_figures + n_passing
    # the review report: operating points recomputed from the bundle's own confidences
    assert "Operating points at 95% InD acceptance" in html and "<nav class='toc'>" in html
    assert "@media print" in html and "name = &quot;KNN&quot;" in html  # the configuration
    assert "run id " in html and "seed 0" in html
    assert "AUROC (AUC()) per OoD set" in html  # the plain name first, the formal one beside
    for name in ("Softmax()", "KNN(k=5) @ 1-11"):
        rows = confs[confs["score"] == name]
        ind = rows.loc[rows["dataset"] == "InD", "confidence"].to_numpy()
        oods = [
            rows.loc[rows["dataset"] == t, "confidence"].to_numpy()
            for t in ("Vertical flip", "MNIST digits")
        ]
        table = operating_point_table(
            [name], [ind], [[o] for o in oods], ["Vertical flip", "MNIST digits"]
        )
        assert set(table["InD accepted"]) == {"190 of 200"}
        for cell in table["OoD rejected"]:
            assert f"<td>{cell}</td>" in html, cell
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
    assert "Energy: all 100 confidences on" in html

    def at(heading: str) -> int:
        found = re.search(rf"<h2 id='s\d+'>{heading}", html)
        assert found, heading
        return found.start()

    assert at("Warnings</h2>") < at("Operating points at 95%") < html.index("figure-0")


# Issue 15: trust comes from the person at the keyboard (--trust-repo), never from the file.
@pytest.mark.parametrize(
    ("repo", "in_file", "flag", "code", "trusted"),
    [
        ("local", "true", False, 2, None),  # a request, not consent: refused before the run
        ("local", "true", True, 1, True),
        ("local", None, True, 1, True),
        ("local", "false", True, 1, True),
        ("local", None, False, 1, False),  # the run itself then refuses the repo
        ("bundled", "true", False, 1, False),  # bundled needs no trust; the request is moot
    ],
)
def test_trust_comes_from_the_command_line_never_from_the_file(
    repo, in_file, flag, code, trusted, tmp_path, monkeypatch, capsys
):
    seen = []

    def fake_run(config, cache=None, progress=None):
        seen.append(config.trust_repo)
        raise ValueError("stopped after the trust check")

    monkeypatch.setattr("ood_core.runner.run", fake_run)
    cfg = example_config()
    if repo == "local":
        (tmp_path / "hub").mkdir()
        (tmp_path / "hub" / "hubconf.py").write_text("raise SystemExit('the repo code ran')\n")
        cfg.model_repo = str(tmp_path / "hub")
    text = cfg.to_toml()
    if in_file is not None:
        text = text.replace("[model]\n", f"[model]\ntrust_repo = {in_file}\n", 1)
    path = tmp_path / "run.toml"
    path.write_text(text)
    assert main(["run", str(path), "--quiet", *(["--trust-repo"] if flag else [])]) == code
    err = capsys.readouterr().err
    assert seen == ([] if trusted is None else [trusted])
    if trusted is None:
        assert f"'{tmp_path / 'hub'}'" in err and "--trust-repo" in err and str(path) in err
        assert "request, not consent" in err and "Traceback" not in err


def test_a_config_with_a_bom_or_thousands_of_problems_reads_well(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_bytes(b"\xef\xbb\xbf" + example_config().to_toml().encode())
    assert RunConfig.from_toml(path.read_text(encoding="utf-8")) == example_config()
    unknown = "".join(f"key{i} = {i}\n" for i in range(10_000))
    path.write_text(example_config().to_toml().replace("[data]\n", "[data]\n" + unknown, 1))
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "10,000 problems:" in err and "... and 9,990 more" in err
    assert len(err) < 2_000 and err.count("\n") < 15  # was 1.1 MB
