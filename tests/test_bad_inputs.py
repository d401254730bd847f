"""Bad and unusual inputs, table-driven: each row is one input and the clear error (or the correct
result) it must give.

Tables (one parametrized test, or a pair, per table; append rows to the table of their group):

* ``CONFIG_FILE_ROWS`` - run configs (TOML) with wrong types, ranges, unknown keys, unknown
  registry names, duplicate or reserved titles: ``RunConfig.from_toml`` raises ``ConfigError``
  naming the file, the section, the key, the value and what is expected, and ``ood-lens run``
  exits 2 with that message, no traceback, nothing computed or written.
* ``CONFIG_CODE_ROWS`` - the same checks on a ``RunConfig`` built in code (``validate`` / ``run``).
* ``OUT_DIR_ROWS`` - ``--out`` folders that must be refused before any computation (exit 2,
  nothing touched): non-empty, a file, under a file, a link, unwritable, holding the config...
* ``CLI_ROWS`` - other CLI inputs and failures: exit codes (2 bad input, 1 failure), one line,
  no traceback (one behind ``--debug``).
* ``TITLE_ROWS`` - scenario titles: duplicates and the InD label are refused; distinct titles
  give distinct, correct rows (results are keyed by scenario identity, not title).
* Export safety and Ctrl-C: ``--force`` replaces a folder only once the new one is complete,
  ``run.json`` is written last, an interrupt leaves nothing half-written (exit 130).
* Clamped sizes are reported and the exported config records what was used.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tomli_w
import torch

from ood_core import outdir
from ood_core.cli import main
from ood_core.config import ConfigError, RunConfig, ScenarioSpec, ScoreSpec
from ood_core.runner import RunCache, run

BASE: dict[str, Any] = {
    "model": {"repo": "bundled", "entry": "tiniest"},
    "data": {"ind_dataset": "fashion_mnist", "n_calibration": 200, "n_test": 100, "seed": 0},
    "evaluation": {"metrics": ["AUC()"]},
    "scores": [{"name": "Softmax"}],
    "scenarios": [{"kind": "vertical_flip"}],
}


def setv(path: str, value: Any) -> Callable[[dict], None]:
    """A patch setting ``path`` (``"data.n_test"``, ``"scores.0.params.k"``) to ``value``."""

    def patch(d: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d.setdefault(p, {})
        if isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value

    return patch


def knn(**entry: Any) -> Callable[[dict], None]:
    def patch(d: dict) -> None:
        d["scores"] = [{"name": "KNN", "params": {"k": 5}, "layers": ["1-11"]} | entry]

    return patch


def scenarios(*entries: dict) -> Callable[[dict], None]:
    def patch(d: dict) -> None:
        d["scenarios"] = list(entries)

    return patch


def raw(text: str) -> str:
    return text


def config_text(row: Callable[[dict], None] | str) -> str:
    if isinstance(row, str):
        return row
    d = copy.deepcopy(BASE)
    row(d)
    return tomli_w.dumps(d)


# ------------------------------------------------------------------ config file rows
# (id, patch of BASE or raw TOML text, substrings the message must contain)
CONFIG_FILE_ROWS = [
    # [data]: types and ranges
    (
        "n_test-string",
        setv("data.n_test", "100"),
        ['[data] n_test = "100"', "a string", "whole number"],
    ),
    ("n_test-float", setv("data.n_test", 100.0), ["[data] n_test = 100.0", "a float", ">= 1"]),
    ("n_test-bool", setv("data.n_test", True), ["[data] n_test = true", "a boolean"]),
    ("n_calibration-zero", setv("data.n_calibration", 0), ["[data] n_calibration = 0", ">= 1"]),
    ("n_calibration-negative", setv("data.n_calibration", -5), ["[data] n_calibration = -5"]),
    ("seed-negative", setv("data.seed", -1), ["[data] seed = -1", "[0, 2147483647]"]),
    ("seed-string", setv("data.seed", "0"), ['[data] seed = "0"', "a string"]),
    ("seed-huge", setv("data.seed", 2**40), ["[data] seed = 1099511627776", "[0, 2147483647]"]),
    (
        "ind-dataset-empty",
        setv("data.ind_dataset", ""),
        ['[data] ind_dataset = ""', "bundled dataset name"],
    ),
    (
        "test-split-unknown",
        setv("data.test_split", "tset"),
        ['[data] test_split = "tset"', "calibration, test"],
    ),
    (
        "data-unknown-key",
        setv("data.n_calibraton", 100),
        ["[data] n_calibraton: unknown key", 'did you mean "n_calibration"?'],
    ),
    # [evaluation]
    (
        "batch-size-zero",
        setv("evaluation.batch_size", 0),
        ["[evaluation] batch_size = 0", "[1, 65536]"],
    ),
    ("batch-size-negative", setv("evaluation.batch_size", -8), ["[evaluation] batch_size = -8"]),
    (
        "batch-size-huge",
        setv("evaluation.batch_size", 10**9),
        ["batch_size = 1000000000", "[1, 65536]"],
    ),
    ("batch-size-float", setv("evaluation.batch_size", 64.0), ["batch_size = 64.0", "a float"]),
    (
        "metrics-empty",
        setv("evaluation.metrics", []),
        ["[evaluation] metrics = []", "non-empty list"],
    ),
    ("metrics-not-a-list", setv("evaluation.metrics", "AUC()"), ['metrics = "AUC()"', "a string"]),
    (
        "metric-unknown",
        setv("evaluation.metrics", ["AUC()", "AUCC()"]),
        ['[evaluation] metrics[1] = "AUCC()"'],
    ),
    (
        "metric-not-a-string",
        setv("evaluation.metrics", [3]),
        ["[evaluation] metrics[0] = 3", "an integer"],
    ),
    (
        "metric-twice",
        setv("evaluation.metrics", ["AUC()", "AUC"]),
        ['metrics[1] = "AUC"', "already listed"],
    ),
    (
        "baseline-out-of-range",
        setv("evaluation.baseline", 3),
        ["[evaluation] baseline = 3", "index (0 to 0)"],
    ),
    ("baseline-negative", setv("evaluation.baseline", -1), ["[evaluation] baseline = -1"]),
    (
        "baseline-unknown-name",
        setv("evaluation.baseline", "Sofmax"),
        ['[evaluation] baseline = "Sofmax"', 'did you mean "Softmax"?'],
    ),
    (
        "baseline-bool",
        setv("evaluation.baseline", True),
        ["[evaluation] baseline = true", "a boolean"],
    ),
    (
        "n-boot-runaway",
        setv("evaluation.n_boot", 10**8),
        ["[evaluation] n_boot = 100000000", "[0, 10000]"],
    ),
    ("n-boot-float", setv("evaluation.n_boot", 1.5), ["[evaluation] n_boot = 1.5", "a float"]),
    (
        "evaluation-unknown-key",
        setv("evaluation.n_bot", 100),
        ["n_bot: unknown key", 'did you mean "n_boot"?'],
    ),
    # [model] and the sections themselves
    ("model-entry-empty", setv("model.entry", ""), ['[model] entry = ""', "entry point name"]),
    ("model-repo-int", setv("model.repo", 3), ["[model] repo = 3", "an integer", "hub reference"]),
    (
        "model-unknown-key",
        setv("model.rpo", "bundled"),
        ["[model] rpo: unknown key", 'did you mean "repo"?'],
    ),
    (
        "section-typo",
        raw("[modle]\nrepo = 'bundled'\n"),
        ["Unknown section(s) ['modle']", '"model"'],
    ),
    ("section-not-a-table", raw('model = "bundled"\n'), ["[model] must be a table", '"bundled"']),
    ("scores-not-tables", raw('scores = ["Softmax"]\n'), ["scores must be an array of tables"]),
    ("not-toml", raw("[model\n"), ["not valid TOML", "line 1"]),
    # [[scores]]
    ("no-scores", setv("scores", []), ["no scores", "at least one score"]),
    (
        "score-unknown",
        setv("scores.0.name", "Softmx"),
        ['[[scores]] #1 (Softmx) name = "Softmx": unknown score', 'did you mean "Softmax"?'],
    ),
    ("score-name-missing", setv("scores.0", {"params": {}}), ["[[scores]] #1: missing key 'name'"]),
    (
        "score-unknown-key",
        setv("scores.0.layer", ["1-11"]),
        ["[[scores]] #1 (Softmax) layer: unknown key", 'did you mean "layers"?'],
    ),
    ("score-param-string", knn(params={"k": "5"}), ["[[scores]] #1 (KNN) params:", "'k'", "'5'"]),
    ("score-param-range", knn(params={"k": 0}), ["[[scores]] #1 (KNN) params:", "'k'", "got 0"]),
    (
        "score-param-unknown",
        knn(params={"kk": 5}),
        ["[[scores]] #1 (KNN) params.kk", 'did you mean "k"?'],
    ),
    (
        "score-param-runaway",
        raw(
            tomli_w.dumps(
                BASE
                | {"scores": [{"name": "IsoMax", "params": {"n_steps": 10**8}, "layers": ["1-11"]}]}
            )
        ),
        ["[[scores]] #1 (IsoMax) params:", "n_steps", "100000000"],
    ),
    ("layer-malformed", knn(layers=["1-x"]), ['[[scores]] #1 (KNN) layers[0] = "1-x"', '"1-11"']),
    ("layer-negative", knn(layers=[[1, -2]]), ["[[scores]] #1 (KNN) layers[0] = [1, -2]"]),
    ("layer-not-a-list", knn(layers="1-11"), ['layers = "1-11"', "a string"]),
    (
        "layers-ignored",
        setv("scores.0.layers", ["1-11"]),
        ['(Softmax) layers = ["1-11"]', "remove layers"],
    ),
    (
        "layers-missing",
        knn(layers=[]),
        ["[[scores]] #1 (KNN) layers:", "reads internal activations"],
    ),
    (
        "score-twice",
        setv("scores", [{"name": "Softmax"}, {"name": "Softmax"}]),
        ["[[scores]] #2 (Softmax) repeats [[scores]] #1"],
    ),
    # [[scenarios]]
    ("no-scenarios", setv("scenarios", []), ["no scenarios", "at least one OoD scenario"]),
    (
        "kind-unknown",
        scenarios({"kind": "darkr"}),
        ['kind = "darkr": unknown perturbation', '"darker"'],
    ),
    (
        "kind-param-range",
        scenarios({"kind": "darker", "params": {"factor": 2.0}}),
        ["[[scenarios]] #1 (darker) params:", "'factor'", "got 2.0"],
    ),
    (
        "kind-param-unknown",
        scenarios({"kind": "darker", "params": {"factr": 0.5}}),
        ["[[scenarios]] #1 (darker) params.factr", 'did you mean "factor"?'],
    ),
    (
        "kind-param-seed",
        scenarios({"kind": "uniform_noise", "params": {"seed": -1}}),
        ["[[scenarios]] #1 (uniform_noise) params:", "seed", "-1"],
    ),
    (
        "kind-and-dataset",
        scenarios({"kind": "darker", "dataset": "mnist"}),
        ["either kind", "not both"],
    ),
    (
        "neither-kind-nor-dataset",
        scenarios({"title": "X"}),
        ["[[scenarios]] #1 (X): give either kind"],
    ),
    (
        "kind-with-split",
        scenarios({"kind": "darker", "split": "calibration"}),
        ['split = "calibration"', "split is for datasets"],
    ),
    (
        "kind-with-config",
        scenarios({"kind": "darker", "config": "x"}),
        ['config = "x"', "only datasets"],
    ),
    (
        "dataset-split-unknown",
        scenarios({"dataset": "mnist", "split": "train"}),
        ['[[scenarios]] #1 (mnist) split = "train"', "split(s) test"],
    ),
    (
        "dataset-with-params",
        scenarios({"dataset": "mnist", "params": {"factor": 0.5}}),
        ["only perturbations", "take parameters"],
    ),
    ("bundled-with-config", scenarios({"dataset": "mnist", "config": "x"}), ["has no configs"]),
    (
        "scenario-unknown-key",
        scenarios({"kind": "darker", "titel": "A"}),
        ["titel: unknown key", 'did you mean "title"?'],
    ),
    ("title-empty", scenarios({"kind": "darker", "title": ""}), ['title = ""', "non-empty label"]),
    (
        "title-blank",
        scenarios({"kind": "darker", "title": "   "}),
        ['title = "   "', "non-empty label"],
    ),
    (
        "title-too-long",
        scenarios({"kind": "darker", "title": "x" * 300}),
        ["at most 200 characters"],
    ),
    (
        "title-ind",
        scenarios({"kind": "darker", "title": "InD"}),
        ['title "InD"', "in-distribution"],
    ),
    (
        "title-ind-variant",
        scenarios({"kind": "darker", "title": " ind"}),
        ['title " ind"', "in-distribution"],
    ),
    (
        "titles-duplicate",
        scenarios({"kind": "vertical_flip", "title": "A"}, {"kind": "darker", "title": "A"}),
        ['[[scenarios]] #2 (A) and [[scenarios]] #1 (A) are both titled "A"', "distinct title"],
    ),
    (
        "titles-duplicate-case",
        scenarios({"kind": "vertical_flip", "title": "A"}, {"kind": "darker", "title": "a"}),
        ['both titled "a"'],
    ),
    (
        "titles-duplicate-automatic",
        scenarios({"kind": "vertical_flip"}, {"kind": "vertical_flip"}),
        ['both titled "Vertical flip"'],
    ),
    (
        "titles-duplicate-dataset",
        scenarios({"dataset": "mnist"}, {"dataset": "mnist", "split": "test"}),
        ['both titled "MNIST digits"'],
    ),
    (
        "titles-duplicate-mixed",
        scenarios({"dataset": "mnist", "title": "Vertical flip"}, {"kind": "vertical_flip"}),
        ['both titled "Vertical flip"'],
    ),
    # issue 15: file edge cases (a byte-order mark, runaway nesting, thousands of problems)
    (
        "bom-then-a-bad-value",
        raw("\ufeff" + config_text(setv("data.n_test", "100"))),
        ['[data] n_test = "100"', "a string"],  # located: the BOM was read, not a TOML error
    ),
    (
        "arrays-100k-deep",
        raw("x = " + "[" * 100_000 + "]" * 100_000 + "\n"),
        ["not read: arrays or tables nested more than 32 levels deep (line 1)"],
    ),
    (
        "inline-tables-100k-deep",
        raw("[data]\nx = " + "{a = " * 100_000 + "1" + "}" * 100_000 + "\n"),
        ["nested more than 32 levels deep (line 2)"],
    ),
    (
        "dotted-key-100k-parts",
        raw("a" + ".a" * 100_000 + " = 1\n"),
        ["not read: a dotted key of more than 32 parts (line 1)"],
    ),
    (
        "params-40-deep",
        knn(
            params={
                "k": [
                    [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[5]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]
                ]
            }
        ),
        ["nested more than 32 levels deep"],
    ),
    (
        "unknown-keys-10k",
        lambda d: d["data"].update({f"k{i}": 1 for i in range(10_000)}),
        ["10,000 problems:", "[data] k0: unknown key", "  - ... and 9,990 more"],
    ),
    (
        "unknown-sections-10k",
        lambda d: d.update({f"s{i}": {} for i in range(10_000)}),
        ["Unknown section(s) ['s0', 's1', ", "'s9'] and 9,990 more in the config"],
    ),
    (
        "unknown-key-huge-name",
        setv("data." + "k" * 100_000, 1),
        ["[data] kkkkkkkkkk", "...: unknown key; known keys"],
    ),
    # issue 15: look-alike titles are normalised before the duplicate / reserved-label checks
    (
        "title-ind-zero-width",
        scenarios({"kind": "darker", "title": "InD\u200b"}),
        ['the title "InD\\u200b"', "in-distribution"],
    ),
    (
        "title-ind-fullwidth",
        scenarios({"kind": "darker", "title": "\uff29\uff4e\uff24"}),
        ['written "\\uff29\\uff4e\\uff24"', "in-distribution"],
    ),
    (
        "title-ind-no-break-space",
        scenarios({"kind": "darker", "title": "\u00a0InD\u00a0"}),
        ['the title "\\u00a0InD\\u00a0"', "in-distribution"],
    ),
    (
        "titles-duplicate-nfc-nfd",
        scenarios(
            {"kind": "vertical_flip", "title": "Caf\u00e9"},
            {"kind": "darker", "title": "Cafe\u0301"},
        ),
        ["both titled", 'written "Cafe\\u0301" and "Caf\\u00e9"', "distinct title"],
    ),
    (
        "titles-duplicate-trailing-spaces-and-bom",
        scenarios(
            {"kind": "vertical_flip", "title": "A"}, {"kind": "darker", "title": "A \ufeff "}
        ),
        ['[[scenarios]] #2 (A \\ufeff ) and [[scenarios]] #1 (A) are both titled "A \\ufeff "'],
    ),
    (
        "titles-duplicate-zero-width",
        scenarios(
            {"kind": "vertical_flip", "title": "Flip"}, {"kind": "darker", "title": "Fl\u200bip"}
        ),
        ['both titled "Fl\\u200bip"', 'written "Fl\\u200bip" and "Flip"'],
    ),
    (
        "titles-duplicate-inner-spaces",
        scenarios({"kind": "vertical_flip", "title": "A B"}, {"kind": "darker", "title": "A \t B"}),
        ["both titled", "distinct title"],
    ),
    (
        "title-zero-width-only",
        scenarios({"kind": "darker", "title": "\u200b\u2060"}),
        ['title = "\\u200b\\u2060"', "non-empty label"],
    ),
    # issue 15: a file never grants trust; its trust_repo is a request (true or false only)
    (
        "trust-repo-string",
        setv("model.trust_repo", "yes"),
        ['[model] trust_repo = "yes" (a string)', "only a request"],
    ),
]


@pytest.mark.parametrize(
    ("row", "needles"), [r[1:] for r in CONFIG_FILE_ROWS], ids=[r[0] for r in CONFIG_FILE_ROWS]
)
def test_config_file_rows_raise_located_errors(row, needles):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_toml(config_text(row), source="cfg.toml")
    message = str(info.value)
    assert message.startswith("cfg.toml: ")
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"


@pytest.mark.parametrize(
    ("row", "needles"), [r[1:] for r in CONFIG_FILE_ROWS], ids=[r[0] for r in CONFIG_FILE_ROWS]
)
def test_config_file_rows_exit_2_before_anything_is_written(row, needles, tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(config_text(row))
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {cfg}: ")
    for needle in needles:
        assert needle in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.toml"]  # no temp folder either


def test_all_problems_are_reported_at_once():
    text = config_text(
        lambda d: (
            setv("data.n_calibraton", 5)(d),
            setv("data.seed", -1)(d),
            setv("scores.0.name", "Softmx")(d),
        )
    )
    with pytest.raises(ConfigError) as info:
        RunConfig.from_toml(text)
    assert len(info.value.problems) == 3
    assert str(info.value).startswith("3 problems:\n  - ")


def test_valid_config_values_are_accepted():
    """The good twins of the rows above: what the messages ask for is accepted."""
    text = config_text(
        lambda d: (
            setv("evaluation.baseline", "KNN(k=5) @ 1-11")(d),
            setv("evaluation.n_boot", 10_000)(d),
            setv(
                "scores",
                [{"name": "Softmax"}, {"name": "KNN", "params": {"k": 5}, "layers": [[1, 11]]}],
            )(d),
            scenarios(
                {"kind": "darker", "title": "A"},
                {"kind": "vertical_flip", "title": "Indoor"},
                {"dataset": "owner/set", "config": "a"},
                {"dataset": "owner/set", "config": "b"},
            )(d),
        )
    )
    cfg = RunConfig.from_toml(text)
    assert cfg.baseline == 1 and cfg.n_boot == 10_000
    assert [s.describe() for s in cfg.scenarios] == [
        "A",
        "Indoor",
        "owner/set (a, test)",
        "owner/set (b, test)",
    ]
    assert RunConfig.from_toml(setv_text("evaluation.baseline", "Softmax")).baseline == 0


def setv_text(path: str, value: Any) -> str:
    return config_text(setv(path, value))


# ------------------------------------------------------------------ configs built in code
def _code(**kw: Any) -> RunConfig:
    base = dict(
        n_calibration=200,
        n_test=100,
        scores=[ScoreSpec("Softmax")],
        scenarios=[ScenarioSpec(kind="vertical_flip")],
        metrics=["AUC()"],
    )
    return RunConfig(**(base | kw))


CONFIG_CODE_ROWS = [
    ("n_test-string", _code(n_test="5"), ['[data] n_test = "5"', "a string"]),
    ("n_calibration-float", _code(n_calibration=2.5), ["[data] n_calibration = 2.5", "a float"]),
    ("batch-size-zero", _code(batch_size=0), ["[evaluation] batch_size = 0"]),
    ("seed-negative", _code(seed=-3), ["[data] seed = -3"]),
    ("metrics-empty", _code(metrics=[]), ["[evaluation] metrics = []"]),
    ("baseline-name-absent", _code(baseline="Energy"), ['baseline = "Energy"', "no such score"]),
    (
        "score-param",
        _code(scores=[ScoreSpec("KNN", {"k": -1}, ["1-11"])]),
        ["(KNN) params:", "got -1"],
    ),
    (
        "duplicate-titles",
        _code(
            scenarios=[
                ScenarioSpec(kind="vertical_flip", title="A"),
                ScenarioSpec(kind="darker", title="A"),
            ]
        ),
        ['both titled "A"'],
    ),
    ("ind-title", _code(scenarios=[ScenarioSpec(kind="darker", title="InD")]), ['title "InD"']),
]


@pytest.mark.parametrize(
    ("config", "needles"), [r[1:] for r in CONFIG_CODE_ROWS], ids=[r[0] for r in CONFIG_CODE_ROWS]
)
def test_config_code_rows_fail_validation_and_run_before_loading_anything(config, needles):
    cache = RunCache()
    for call in (config.validate, lambda: run(config, cache)):
        with pytest.raises(ConfigError) as info:
            call()
        for needle in needles:
            assert needle in str(info.value)
    assert not cache.models and not cache.datasets  # nothing was loaded


def test_validate_resolves_a_baseline_name_and_keeps_the_caller_config():
    cfg = _code(scores=[ScoreSpec("Softmax"), ScoreSpec("Energy")], baseline="Energy")
    checked = cfg.validate()
    assert checked.baseline == 1 and cfg.baseline == "Energy"
    assert checked.scores == cfg.scores and checked.scores is not cfg.scores


# ------------------------------------------------------------------ --out folders
def _nonempty(tmp: Path) -> Path:
    (tmp / "out").mkdir()
    (tmp / "out" / "metrics.csv").write_text("old run")
    return tmp / "out"


def _file(tmp: Path) -> Path:
    (tmp / "out").write_text("a file")
    return tmp / "out"


def _under_file(tmp: Path) -> Path:
    (tmp / "afile").write_text("a file")
    return tmp / "afile" / "sub" / "out"


def _link(tmp: Path) -> Path:
    (tmp / "target").mkdir()
    (tmp / "out").symlink_to(tmp / "target", target_is_directory=True)
    return tmp / "out"


def _dangling_link(tmp: Path) -> Path:
    (tmp / "out").symlink_to(tmp / "nowhere")
    return tmp / "out"


def _unwritable(tmp: Path) -> Path:
    return Path("/proc/ood-lens-test/out")  # not creatable, even by root


def _read_only_dir(tmp: Path) -> Path:
    (tmp / "ro").mkdir()
    os.chmod(tmp / "ro", 0o555)
    return tmp / "ro" / "out"


def _holds_config(tmp: Path) -> Path:
    (tmp / "out").mkdir()
    (tmp / "out" / "metrics.csv").write_text("old run")
    return tmp / "out"


def _foreign_files(tmp: Path) -> Path:
    (tmp / "out").mkdir()
    (tmp / "out" / "metrics.csv").write_text("old run")
    (tmp / "out" / "thesis.tex").write_text("precious")
    return tmp / "out"


def _root(tmp: Path) -> Path:
    return Path("/")


# (id, setup(tmp) -> out path, extra args, config inside out?, substrings of the message)
OUT_DIR_ROWS = [
    ("non-empty", _nonempty, [], False, ["already exists and is not empty", "--force"]),
    ("is-a-file", _file, [], False, ["is an existing file, not a folder"]),
    ("is-a-file-force", _file, ["--force"], False, ["is an existing file, not a folder"]),
    ("under-a-file", _under_file, [], False, ["lies under", "afile, which is a file"]),
    ("symlink", _link, [], False, ["is a symbolic link", "never writes through links"]),
    ("symlink-force", _link, ["--force"], False, ["is a symbolic link"]),
    ("dangling-symlink", _dangling_link, [], False, ["is a symbolic link"]),
    ("unwritable", _unwritable, [], False, ["cannot create files in /proc"]),
    pytest.param(
        _read_only_dir,
        [],
        False,
        ["cannot create files in"],
        marks=pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions"),
        id="read-only-folder",
    ),
    (
        "holds-the-config",
        _holds_config,
        [],
        True,
        ["lies inside the output folder", "never touches"],
    ),
    ("holds-the-config-force", _holds_config, ["--force"], True, ["lies inside the output folder"]),
    ("foreign-files-force", _foreign_files, ["--force"], False, ["does not write (thesis.tex)"]),
    ("filesystem-root", _root, ["--force"], False, ["filesystem root"]),
]


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (links by target, never followed) with its content."""
    snap: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        snap[rel] = (
            f"-> {os.readlink(p)}" if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
        )
    return snap


def _row_params(rows: list) -> list:
    return [pytest.param(*r[1:], id=r[0]) if type(r) is tuple else r for r in rows]


@pytest.mark.parametrize(("setup", "extra", "config_inside", "needles"), _row_params(OUT_DIR_ROWS))
def test_out_dir_rows_fail_fast_and_touch_nothing(
    setup, extra, config_inside, needles, tmp_path, capsys, monkeypatch
):
    out = setup(tmp_path)
    cfg = (out if config_inside else tmp_path) / "cfg.toml"
    cfg.write_text(config_text(lambda d: None))
    before = _snapshot(tmp_path)
    monkeypatch.setattr("ood_core.runner.run", _must_not_run)
    t0 = time.perf_counter()
    code = main(["run", str(cfg), "--out", str(out), "--quiet", *extra])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 2 and elapsed < 1.0
    assert err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert _snapshot(tmp_path) == before


def _must_not_run(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the run started although the input was bad")


def test_bad_out_fails_before_torch_is_imported(tmp_path):
    """In a fresh interpreter: a bad --out is refused without importing torch (well under 1 s)."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "cfg.toml").write_text(config_text(lambda d: None))
    code = (
        "import sys, time; t = time.perf_counter(); from ood_core.cli import main; "
        f"rc = main(['run', {str(tmp_path / 'cfg.toml')!r}, '--out', {str(tmp_path / 'afile')!r}]); "
        "print(rc, 'torch' in sys.modules, time.perf_counter() - t)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    rc, torch_loaded, seconds = res.stdout.split()
    assert (rc, torch_loaded) == ("2", "False"), res.stderr
    assert float(seconds) < 5.0  # generous on a loaded machine; typically ~0.2 s
    assert "is an existing file" in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------------------ export safety + Ctrl-C
@pytest.fixture(scope="module")
def small_result():
    """One real run (bundled model and data, a few seconds), reused by the export tests."""
    cfg = RunConfig.from_toml(config_text(lambda d: None))
    return run(cfg, RunCache())


@pytest.fixture
def fake_run(small_result, monkeypatch, tmp_path):
    """``ood-lens run`` with the computation replaced by ``small_result``: returns the config."""
    monkeypatch.setattr("ood_core.runner.run", lambda config, **kw: small_result)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(config_text(lambda d: None))
    return cfg


def test_run_json_is_written_last_and_describes_the_run(fake_run, tmp_path, monkeypatch, capsys):
    order: list[str] = []
    write = outdir._write_new
    monkeypatch.setattr(
        outdir, "_write_new", lambda p, data: (order.append(p.name), write(p, data))
    )
    assert main(["run", str(fake_run), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert order[-1] == "run.json" and set(order) == outdir.BUNDLE_FILES
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["status"] == "complete"
    assert info["config_sha256"] == hashlib.sha256(fake_run.read_bytes()).hexdigest()
    assert info["torch_version"] == torch.__version__ and info["python_version"].count(".") == 2
    assert info["ood_lens_version"] and info["timings"]["run_seconds"] > 0
    for name, meta in info["files"].items():
        assert hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest() == meta["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.toml", "out"]  # no temp left


def _earlier_run(out: Path, text: str = "old run") -> Path:
    """A folder an earlier run wrote: its run.json lists its files (what --force replaces)."""
    data = text.encode()
    manifest = {"status": "complete", "files": {"metrics.csv": {"bytes": len(data)}}}
    outdir.write_atomic(out, [("metrics.csv", data), ("run.json", json.dumps(manifest).encode())])
    return out


def test_force_replaces_an_earlier_run_only_when_complete(fake_run, tmp_path, capsys):
    out = _earlier_run(tmp_path / "out")
    (out / "report.html").symlink_to(tmp_path / "victim.html")  # a link planted in the folder
    (tmp_path / "victim.html").write_text("must stay")
    assert main(["run", str(fake_run), "--out", str(out), "--quiet"]) == 2
    assert main(["run", str(fake_run), "--out", str(out), "--quiet", "--force"]) == 2  # the link
    assert "report.html is a symbolic link" in " ".join(capsys.readouterr().err.split())
    assert (out / "metrics.csv").read_text() == "old run"
    (out / "report.html").unlink()
    assert main(["run", str(fake_run), "--out", str(out), "--quiet", "--force"]) == 0
    assert (out / "metrics.csv").read_text() != "old run"
    assert (tmp_path / "victim.html").read_text() == "must stay"
    assert sorted(p.name for p in out.iterdir()) == sorted(outdir.BUNDLE_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.toml", "out", "victim.html"]


def test_an_empty_existing_folder_is_used_without_force(fake_run, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["run", str(fake_run), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "run.json").exists()


def _interrupt_at(name: str) -> Callable[[Path, bytes], None]:
    write = outdir._write_new

    def wrapped(path: Path, data: bytes) -> None:
        if path.name == name:
            raise KeyboardInterrupt
        write(path, data)

    return wrapped


@pytest.mark.parametrize("where", ["config.toml", "run.json", "swap"])
@pytest.mark.parametrize("force", [False, True], ids=["new-folder", "force-over-earlier-run"])
def test_ctrl_c_during_export_leaves_nothing_half_written(
    where, force, fake_run, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    if force:
        _earlier_run(out, "earlier run")
    before = _snapshot(tmp_path)
    if where == "swap":

        def no_swap(*args: Any, **kwargs: Any) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(outdir, "_swap_into_place", no_swap)
    else:
        monkeypatch.setattr(outdir, "_write_new", _interrupt_at(where))
    code = main(
        ["run", str(fake_run), "--out", str(out), "--quiet", *(["--force"] if force else [])]
    )
    err = capsys.readouterr().err
    assert code == 130
    assert err.strip().splitlines()[-1] == "interrupted; nothing written" and "Traceback" not in err
    assert _snapshot(tmp_path) == before  # earlier run intact, no temp folder, no new folder


def test_ctrl_c_during_the_run_exits_130_without_traceback(tmp_path, monkeypatch, capsys):
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("ood_core.runner.run", interrupted)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(config_text(lambda d: None))
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 130
    captured = capsys.readouterr()
    assert captured.err == "interrupted; nothing written\n" and "Traceback" not in captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.toml"]


@pytest.mark.slow
@pytest.mark.parametrize("delay", [1.5, 4.0], ids=["while-importing", "while-computing"])
def test_a_real_ctrl_c_mid_run_exits_130_with_one_line(tmp_path, delay):
    """SIGINT to a real ``ood-lens run`` while it imports torch (where a Ctrl-C can surface as an
    ``ImportError``) or computes: one line, exit 130, nothing written."""
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        config_text(lambda d: (setv("data.n_calibration", 5000)(d), setv("data.n_test", 5000)(d)))
    )
    code = "import sys; from ood_core.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "run", str(cfg), "--out", str(tmp_path / "out"), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err == "interrupted; nothing written\n" and "Traceback" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.toml"]


def test_swap_failure_restores_the_earlier_run(tmp_path, monkeypatch):
    out = _earlier_run(tmp_path / "out", "earlier run")
    real_rename = os.rename

    def flaky(src: Any, dst: Any) -> None:
        if ".partial-" in str(src):
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(outdir.os, "rename", flaky)
    with pytest.raises(KeyboardInterrupt):
        outdir.write_atomic(out, [("metrics.csv", b"new")], force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "metrics.csv").read_text() == "earlier run"


# ------------------------------------------------------------------ other CLI inputs
def _write_cfg(tmp: Path, text: str | bytes = "") -> Path:
    p = tmp / "cfg.toml"
    p.write_bytes(
        text if isinstance(text, bytes) else (text or config_text(lambda d: None)).encode()
    )
    return p


def _raise(exc: BaseException) -> Callable[..., None]:
    def f(*args: Any, **kwargs: Any) -> None:
        raise exc

    return f


# (id, setup(tmp) -> argv, replacement for runner.run or None, exit code, substrings of stderr)
CLI_ROWS = [
    ("config-missing", lambda t: ["run", str(t / "nope.toml")], None, 2, ["no such config file"]),
    ("config-is-a-folder", lambda t: ["run", str(t)], None, 2, ["is not a file"]),
    (
        "config-not-utf8",
        lambda t: ["run", str(_write_cfg(t, b"\xff\xfe[model]"))],
        None,
        2,
        ["cannot read the config", "utf-8"],
    ),
    (
        "config-not-toml",
        lambda t: ["run", str(_write_cfg(t, "[model\n"))],
        None,
        2,
        ["not valid TOML"],
    ),
    (
        "data-missing",
        lambda t: ["run", str(_write_cfg(t, setv_text("data.ind_dataset", str(t / "x.npz"))))],
        None,
        1,
        ["the run failed", "No such file"],
    ),
    (
        "layer-not-in-model",
        lambda t: ["run", str(_write_cfg(t, config_text(knn(layers=["1-99"]))))],
        None,
        1,
        ["the run failed", "Unknown layer id 1-99", "depth 1: 1-1 to 1-12"],
    ),
    (
        "run-raises-value-error",
        lambda t: ["run", str(_write_cfg(t))],
        _raise(ValueError("bad data")),
        1,
        ["error: the run failed: bad data"],
    ),
    (
        "run-raises-bug",
        lambda t: ["run", str(_write_cfg(t))],
        _raise(TypeError("oops")),
        1,
        ["error: unexpected TypeError: oops", "--debug"],
    ),
    (
        "unknown-option",
        lambda t: ["run", str(_write_cfg(t)), "--froce"],
        None,
        2,
        ["unrecognized arguments"],
    ),
    # issue 15: config file edge cases and trust asked for by the file
    (
        "config-utf8-bom",
        lambda t: [
            "run",
            str(_write_cfg(t, b"\xef\xbb\xbf" + config_text(lambda d: None).encode())),
        ],
        _raise(ValueError("reached the run")),
        1,
        ["error: the run failed: reached the run"],  # the BOM was read as nothing
    ),
    (
        "config-100k-nested",
        lambda t: ["run", str(_write_cfg(t, "x = " + "[" * 100_000 + "]" * 100_000))],
        None,
        2,
        ["nested more than 32 levels deep"],
    ),
    (
        "config-10k-unknown-keys",
        lambda t: ["run", str(_write_cfg(t, _many_unknown_keys()))],
        None,
        2,
        ["10,000 problems:", "and 9,990 more"],
    ),
    (
        "config-asks-trust-for-a-local-repo",
        lambda t: ["run", str(_write_cfg(t, _asking_trust(t, "true")))],
        _raise(AssertionError("ran without --trust-repo")),
        2,
        ["[model] trust_repo = true is a request, not consent", "someone_hub'", "--trust-repo"],
    ),
    (
        "config-asks-trust-with-a-string",
        lambda t: ["run", str(_write_cfg(t, _asking_trust(t, '"yes"')))],
        _raise(AssertionError("ran")),
        2,
        ['[model] trust_repo = "yes" (a string)'],
    ),
    (
        "config-asks-trust-for-a-github-repo",
        lambda t: ["run", str(_write_cfg(t, _asking_trust(t, "true", "someone/models")))],
        _raise(AssertionError("ran without --trust-repo")),
        2,
        ["a request, not consent", "'someone/models'", "--trust-repo"],
    ),
]


def _many_unknown_keys() -> str:
    return config_text(lambda d: d["data"].update({f"k{i}": 1 for i in range(10_000)}))


def _asking_trust(tmp: Path, flag: str, repo: str | None = None) -> str:
    """A config naming someone's hub repo (a local folder unless ``repo``) with trust_repo."""
    if repo is None:
        (tmp / "someone_hub").mkdir(exist_ok=True)
        (tmp / "someone_hub" / "hubconf.py").write_text("raise SystemExit('the repo code ran')\n")
        repo = str(tmp / "someone_hub")
    text = config_text(setv("model.repo", repo))
    return text.replace("[model]\n", f"[model]\ntrust_repo = {flag}\n", 1)


@pytest.mark.parametrize(("argv", "fake", "code", "needles"), _row_params(CLI_ROWS))
def test_cli_rows_exit_codes_and_one_line_errors(
    argv, fake, code, needles, tmp_path, monkeypatch, capsys
):
    if fake is not None:
        monkeypatch.setattr("ood_core.runner.run", fake)
    args = [*argv(tmp_path), "--quiet"]
    try:
        got = main(args)
    except SystemExit as exc:  # argparse
        got = exc.code
    err = capsys.readouterr().err
    assert got == code
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("ood_core.runner.run", _raise(TypeError("oops")))
    assert main(["run", str(_write_cfg(tmp_path)), "--quiet", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "TypeError: oops" in err


# ------------------------------------------------------------------ titles: identity, not title
@pytest.fixture(scope="module")
def title_cache():
    return RunCache()


def _titled(cache: RunCache, *specs: ScenarioSpec) -> pd.DataFrame:
    cfg = RunConfig(
        n_calibration=200,
        n_test=100,
        scores=[ScoreSpec("Softmax"), ScoreSpec("Energy")],
        scenarios=list(specs),
        metrics=["AUC()"],
    )
    res = run(cfg, cache)
    return res.frame.set_index(["score", "ood"])["value"]


FLIP, DARK = dict(kind="vertical_flip"), dict(kind="darker", params={"factor": 0.5})
# (id, scenarios, None for "rejected" or a check of the result against single-scenario runs)
TITLE_ROWS = [
    ("same-title-rejected", [FLIP | {"title": "A"}, DARK | {"title": "A"}], 'both titled "A"'),
    ("ind-title-rejected", [FLIP | {"title": "InD"}], 'title "InD"'),
    ("automatic-duplicate-rejected", [FLIP, FLIP], 'both titled "Vertical flip"'),
    ("distinct-titles-distinct-rows", [FLIP | {"title": "A"}, DARK | {"title": "B"}], None),
    ("same-data-two-titles", [FLIP | {"title": "A"}, FLIP | {"title": "B"}], None),
    ("dataset-and-perturbation", [{"dataset": "mnist", "title": "A"}, DARK | {"title": "B"}], None),
    # issue 15: look-alike titles (normalised: NFC, no invisible characters or outer spaces)
    (
        "nfc-nfd-duplicate-rejected",
        [FLIP | {"title": "Caf\u00e9"}, DARK | {"title": "Cafe\u0301"}],
        'both titled "Café"',
    ),
    ("zero-width-ind-rejected", [FLIP | {"title": "InD\u200b"}], 'title "InD"'),
    ("fullwidth-ind-rejected", [FLIP | {"title": "\uff29\uff4e\uff24"}], "in-distribution"),
    (
        "trailing-space-duplicate-rejected",
        [FLIP | {"title": "A"}, DARK | {"title": "A \u200b "}],
        'both titled "A"',
    ),
    (
        "cleaned-titles-label-rows",
        [FLIP | {"title": " Flip\u200b"}, DARK | {"title": "Cafe\u0301"}],
        None,
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("entries", "rejected"), _row_params(TITLE_ROWS))
def test_title_rows(entries, rejected, title_cache):
    specs = [ScenarioSpec(**e) for e in entries]
    if rejected is not None:
        with pytest.raises(ConfigError, match=re.escape(rejected)):
            _titled(title_cache, *specs)
        return
    together = _titled(title_cache, *specs)
    for spec in specs:  # each row equals the same scenario run on its own
        alone = _titled(title_cache, ScenarioSpec(**{**spec.__dict__, "title": "alone"}))
        for score in ("Softmax()", "Energy()"):
            assert together[(score, spec.title)] == alone[(score, "alone")]
    assert len(together) == 2 * len(specs)


@pytest.mark.slow
def test_flip_auroc_is_not_the_ind_set_compared_with_itself(title_cache):
    """The 'InD' title bug gave 0.495; the flip's real AUROC on this data is far from 0.5."""
    values = _titled(title_cache, ScenarioSpec(kind="vertical_flip", title="Flip"))
    assert abs(values[("Softmax()", "Flip")] - 0.5) > 0.2


def test_hf_sets_differing_only_by_config_get_distinct_titles():
    a = ScenarioSpec(dataset="owner/set", config="plain")
    b = ScenarioSpec(dataset="owner/set", config="noisy")
    assert a.describe() != b.describe() and "plain" in a.describe() and "noisy" in b.describe()
    assert (
        ScenarioSpec(dataset="fashion_mnist", split="calibration").describe()
        != ScenarioSpec(dataset="fashion_mnist").describe()
    )
    RunConfig(scores=[ScoreSpec("Softmax")], scenarios=[a, b]).validate()  # accepted


# ------------------------------------------------------------------ clamped sizes
@pytest.mark.slow
def test_clamped_sizes_are_reported_and_recorded(tmp_path, capsys):
    small = tmp_path / "small.npz"
    imgs = (np.random.default_rng(0).random((50, 28, 28)) * 255).astype(np.uint8)
    np.savez(small, images=imgs, labels=np.zeros(50, dtype=np.int64))
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        config_text(
            lambda d: (
                setv("data.n_calibration", 10**6)(d),
                setv("data.n_test", 80)(d),
                scenarios({"dataset": str(small), "title": "Small"})(d),
            )
        )
    )
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: [data] n_calibration = 1000000 is more than the 5000 samples" in err
    assert "[[scenarios]] #1 (Small): n_test = 80 is more than its 50 samples: used all 50" in err
    used = RunConfig.from_toml((tmp_path / "out" / "config.toml").read_text())
    assert (used.n_calibration, used.n_test) == (5000, 80)
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert len(info["notes"]) == 2 and info["n_calibration"] == 5000
