"""Export bundles read back (ood_core.bundle): the same result without fitting or scoring, the
notation of earlier exports, and a clear refusal when the data drawn again no longer matches.

A bundle is a file people share: ``TAMPER_ROWS`` (one row per tampered bundle: wrong types,
missing columns, NaN, out-of-range values, reordered rows, metrics that disagree with the
confidences, unknown keys, huge or deeply nested JSON) must each be refused with a
:class:`BundleError` naming the file, the field and what was expected; and a bundle never grants
trust to the hub repository its config names, whatever its ``trust_repo`` says."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from ood_core import bundle as bundle_mod
from ood_core import hub
from ood_core.bundle import BundleError, read_bundle, to_result
from ood_core.bundle_writer import export
from ood_core.config import ConfigError, RunConfig, ScenarioSpec, ScoreSpec
from ood_core.runner import RunCache, run


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    cfg = RunConfig(
        n_calibration=150,
        n_test=80,
        n_boot=20,
        scores=[ScoreSpec("Energy"), ScoreSpec("KNN", {"k": 5}, ["1-5", "1-11"])],
        scenarios=[ScenarioSpec(kind="vertical_flip"), ScenarioSpec(dataset="mnist")],
        metrics=["AUC()", "TPR(max_fpr=0.05)"],
    )
    result = run(cfg, RunCache())
    folder = tmp_path_factory.mktemp("bundle") / "run"
    export(result, folder)
    return result, folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    out.mkdir()
    for f in folder.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def test_read_back_equals_the_result_and_fits_nothing(exported) -> None:
    result, folder = exported
    cache = RunCache()
    back = to_result(read_bundle(folder), cache)
    assert not cache.fitted and not cache.confidences  # nothing fitted or scored
    assert back.restored_from == str(folder) and result.restored_from is None
    assert back.score_names == result.score_names == ["Energy()", "KNN(k=5) @ 1-5, 1-11"]
    assert back.ood_titles == result.ood_titles
    np.testing.assert_array_equal(back.confs_ind, result.confs_ind)
    for a, b in zip(back.confs_oods, result.confs_oods, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.evals, result.evals)
    pd.testing.assert_frame_equal(back.frame, result.frame, check_dtype=False)
    np.testing.assert_array_equal(back.ind_predictions, result.ind_predictions)
    assert back.accuracy == result.accuracy
    assert back.ind.images.equal(result.ind.images)
    assert all(a.equal(b) for a, b in zip(back.ood_images, result.ood_images, strict=True))
    assert list(back.timings["score"]) == list(result.timings["score"])
    assert [s.layers for s, _ in back.scores_and_layers] == [(), ((1, 5), (1, 11))]
    assert back.scores_and_layers[1][0].recorder_ is not None  # bound: layer names known


def test_a_read_back_result_exports_the_same_bundle(exported, tmp_path: Path) -> None:
    result, folder = exported
    back = to_result(read_bundle(folder))
    again = export(back, tmp_path / "again")
    assert set(again) >= {"metrics", "confidences"}
    for name in ("metrics.csv", "config.toml"):
        assert (folder / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    pd.testing.assert_frame_equal(
        pd.read_parquet(folder / "confidences.parquet"),
        pd.read_parquet(tmp_path / "again" / "confidences.parquet"),
    )


def test_a_bundle_of_an_earlier_version_reads(exported, tmp_path: Path) -> None:
    """No predictions, no fingerprint, layers written "(1, 5), (1, 11)"."""
    result, folder = exported
    old = _copy(folder, tmp_path)
    info = json.loads((old / "run.json").read_text())
    del info["ind_predictions"], info["images_sha256"]
    (old / "run.json").write_text(json.dumps(info))
    metrics = pd.read_csv(old / "metrics.csv", keep_default_na=False)
    metrics["layers"] = metrics["layers"].replace({"1-5, 1-11": "(1, 5), (1, 11)"})
    metrics.to_csv(old / "metrics.csv", index=False)
    conf = pd.read_parquet(old / "confidences.parquet")
    conf["score"] = conf["score"].replace({"KNN(k=5) @ 1-5, 1-11": "KNN(k=5) @ (1, 5), (1, 11)"})
    conf.to_parquet(old / "confidences.parquet")
    bundle = read_bundle(old)
    assert set(bundle.metrics["layers"]) == {"", "1-5, 1-11"}
    back = to_result(bundle)
    np.testing.assert_array_equal(back.confs_ind, result.confs_ind)
    np.testing.assert_array_equal(back.ind_predictions, result.ind_predictions)  # recomputed


def test_changed_data_is_refused_naming_the_remedy(exported, tmp_path: Path) -> None:
    _, folder = exported
    changed = _copy(folder, tmp_path)
    info = json.loads((changed / "run.json").read_text())
    info["images_sha256"] = "0" * 64
    (changed / "run.json").write_text(json.dumps(info))
    with pytest.raises(BundleError, match="differ from those it scored.*Run its config again"):
        to_result(read_bundle(changed))


def test_missing_confidences_are_refused(exported, tmp_path: Path) -> None:
    _, folder = exported
    cut = _copy(folder, tmp_path)
    conf = pd.read_parquet(cut / "confidences.parquet")
    conf.iloc[:-3].to_parquet(cut / "confidences.parquet")
    with pytest.raises(BundleError, match=r"77 confidences of 'KNN\(k=5\) @ 1-5, 1-11' on"):
        to_result(read_bundle(cut))
    with pytest.raises(BundleError, match="without its confidences"):
        to_result(read_bundle(folder, confidences=False))


def test_incomplete_or_unreadable_bundles_say_so(exported, tmp_path: Path) -> None:
    _, folder = exported
    with pytest.raises(FileNotFoundError, match="run.json is missing"):
        read_bundle(tmp_path)
    broken = _copy(folder, tmp_path)
    (broken / "metrics.csv").unlink()
    with pytest.raises(BundleError, match="Cannot read the run bundle"):
        read_bundle(broken)


def test_a_bundle_never_grants_trust_to_its_model_repo(exported, tmp_path: Path) -> None:
    """A shared bundle naming another hub repo does not run that repo's code unless the caller
    passes trust_repo=True (exported configs never carry trust)."""
    from ood_core.hub import UntrustedRepoError

    _, folder = exported
    hub_dir = tmp_path / "someone_hub"
    hub_dir.mkdir()
    (hub_dir / "hubconf.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('imported.marker').touch()\n"
    )
    shared = _copy(folder, tmp_path)
    config = (shared / "config.toml").read_text()
    assert 'repo = "bundled"' in config and "trust_repo" not in config
    (shared / "config.toml").write_text(config.replace('"bundled"', f'"{hub_dir}"', 1))
    bundle = read_bundle(shared)
    assert bundle.config.model_repo == str(hub_dir) and not bundle.config.trust_repo
    with pytest.raises(UntrustedRepoError):
        to_result(bundle)
    assert not (hub_dir / "imported.marker").exists(), "the repo's code ran"


# ---------------------------------------------------------------------------- tampered bundles
@pytest.fixture(scope="module")
def cache() -> RunCache:
    """One cache for the rows below: the model and data are loaded once."""
    return RunCache()


def _run_json(edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        info = json.loads((folder / "run.json").read_text())
        edit(info)
        (folder / "run.json").write_text(json.dumps(info))

    return mutate


def _run_json_text(text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / "run.json").write_text(text)


def _metrics(edit: Callable[[pd.DataFrame], Any]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        frame = pd.read_csv(folder / "metrics.csv", dtype=str, keep_default_na=False)
        out = edit(frame)
        (frame if out is None else out).to_csv(folder / "metrics.csv", index=False)

    return mutate


def _confidences(edit: Callable[[pd.DataFrame], Any]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        conf = pd.read_parquet(folder / "confidences.parquet")
        out = edit(conf)
        (conf if out is None else out).to_parquet(folder / "confidences.parquet", index=False)

    return mutate


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """Set ``a.b.0.c`` in a parsed run.json."""

    def edit(info: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            info = info[int(p)] if isinstance(info, list) else info[p]
        if isinstance(info, list):
            info[int(last)] = value
        else:
            info[last] = value

    return edit


def _set_cell(column: str, row: int, value: Any) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        frame.loc[row, column] = value
        return frame

    return edit


def _swap_rows(frame: pd.DataFrame, a: int = 0, b: int = 1) -> pd.DataFrame:
    order = list(range(len(frame)))
    order[a], order[b] = order[b], order[a]
    return frame.iloc[order].reset_index(drop=True)


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def _duplicate_key(folder: Path) -> None:
    text = (folder / "run.json").read_text()
    (folder / "run.json").write_text(text.replace('"accuracy":', '"accuracy": 0.1, "accuracy":', 1))


def _drop_column(column: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    return lambda frame: frame.drop(columns=[column])


# (id, how the shared copy is tampered, substrings the BundleError message must contain)
TAMPER_ROWS = [
    # run.json: schema (types, ranges, unknown keys, size, nesting)
    ("accuracy-string", _run_json(_set("accuracy", "0.9")), ['accuracy = "0.9"', "[0, 1]"]),
    ("accuracy-above-1", _run_json(_set("accuracy", 1.5)), ["accuracy = 1.5", "[0, 1]"]),
    ("accuracy-nan", _run_json(_set("accuracy", float("nan"))), ["accuracy = nan", "[0, 1]"]),
    ("prediction-negative", _run_json(_set("ind_predictions.0", -1)), ["ind_predictions[0] = -1"]),
    (
        "prediction-string",
        _run_json(_set("ind_predictions.3", "3")),
        ['ind_predictions[3] = "3"', "class indices"],
    ),
    ("prediction-bool", _run_json(_set("ind_predictions.0", True)), ["ind_predictions[0] = true"]),
    (
        "unknown-key",
        _run_json(_set("evil", {"payload": 1})),
        ["unknown key evil", "known keys: status"],
    ),
    (
        "unknown-nested-key",
        _run_json(_set("timings.extra", 1)),
        ["unknown key timings.extra", "known keys: run_seconds"],
    ),
    (
        "status-not-complete",
        _run_json(_set("status", "running")),
        ['status = "running"', "complete"],
    ),
    ("status-missing", _run_json(lambda i: i.pop("status")), ["missing key status"]),
    (
        "seconds-negative",
        _run_json(_set("timings.operations.0.seconds", -1)),
        ["timings.operations[0].seconds = -1", "seconds >= 0"],
    ),
    (
        "warnings-not-a-list",
        _run_json(_set("warnings", "x")),
        ['warnings = "x"', "list of strings"],
    ),
    (
        "sha256-malformed",
        _run_json(_set("images_sha256", "xyz")),
        ["images_sha256", "64 lowercase"],
    ),
    ("files-wrong-type", _run_json(_set("files", 3)), ["files", "a table of {bytes, sha256}"]),
    ("not-json", _run_json_text('{"status": '), ["not valid JSON"]),
    ("json-array", _run_json_text("[1, 2]"), ["a list", "expected a JSON object"]),
    (
        "json-100k-deep",
        _run_json_text('{"notes": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        ["nested more than 8 levels deep"],
    ),
    ("json-20-deep", _run_json(_set("notes", _nested(20))), ["levels deep", "at most 8"]),
    ("json-duplicate-key", _duplicate_key, ['"accuracy" appears twice']),
    # run.json: against the rest of the bundle
    ("accuracy-disagrees", _run_json(_set("accuracy", 0.5)), ["accuracy = 0.5", "ind_predictions"]),
    (
        "prediction-not-a-class",
        _run_json(_set("ind_predictions.0", 10)),
        ["ind_predictions[0] = 10", "class index below 10"],
    ),
    (
        "predictions-short",
        _run_json(lambda i: i["ind_predictions"].pop()),
        ["ind_predictions holds 79 predictions", "(80)"],
    ),
    ("n-test-disagrees", _run_json(_set("n_test", 79)), ["n_test = 79", "expected 80"]),
    # metrics.csv
    (
        "metrics-missing-column",
        _metrics(_drop_column("value")),
        ["metrics.csv", "missing column(s) ['value']"],
    ),
    (
        "metrics-unknown-column",
        _metrics(lambda f: f.assign(evil="1")),
        ["metrics.csv", "unknown column(s) ['evil']"],
    ),
    (
        "metrics-value-text",
        _metrics(_set_cell("value", 0, "abc")),
        ['metrics.csv line 2, column value = "abc"', "[0, 1]"],
    ),
    (
        "metrics-value-out-of-range",
        _metrics(_set_cell("value", 3, "1.5")),
        ['metrics.csv line 5, column value = "1.5"', "[0, 1]"],
    ),
    (
        "metrics-value-disagrees",
        _metrics(_set_cell("value", 0, "0.5")),
        ["metrics.csv line 2: value = 0.5", "the two files disagree"],
    ),
    ("metrics-rows-reordered", _metrics(_swap_rows), ["metrics.csv line 2", "rows reordered"]),
    (
        "metrics-ci-inverted",
        _metrics(lambda f: _set_cell("ci_high", 0, "0.1")(_set_cell("ci_low", 0, "0.9")(f))),
        ["metrics.csv line 2", "ci_low", "above ci_high"],
    ),
    (
        "metrics-row-dropped",
        _metrics(lambda f: f.iloc[:-1]),
        ["metrics.csv: 7 rows for 2 scores x 2 scenarios x 2 metrics"],
    ),
    (
        "metrics-score-empty",
        _metrics(_set_cell("score", 0, "")),
        ["metrics.csv line 2, column score: empty"],
    ),
    (
        "metrics-metric-renamed",
        _metrics(_set_cell("metric", 0, "AUC(max_fpr=0.2)")),
        ["metrics.csv line 2", "AUC(max_fpr=0.2)", "rows reordered or edited"],
    ),
    # confidences.parquet
    (
        "confidences-missing-column",
        _confidences(_drop_column("confidence")),
        ["confidences.parquet", "expected exactly the columns"],
    ),
    (
        "confidences-as-text",
        _confidences(lambda c: c.assign(confidence=c["confidence"].astype(str))),
        ["confidences.parquet: column confidence", "floating-point numbers"],
    ),
    (
        "samples-as-floats",
        _confidences(lambda c: c.assign(sample=c["sample"].astype(float))),
        ["confidences.parquet: column sample holds float64", "whole numbers"],
    ),
    (
        "confidence-nan",
        _confidences(_set_cell("confidence", 5, float("nan"))),
        ["confidences.parquet: 1 confidence(s) are NaN", "row 5", "sample 5"],
    ),
    (
        "sample-negative",
        _confidences(_set_cell("sample", 0, -1)),
        ["confidences.parquet row 0: sample = -1", ">= 0"],
    ),
    (
        "confidences-rows-reordered",
        _confidences(lambda c: c.sample(frac=1.0, random_state=0).reset_index(drop=True)),
        ["confidences.parquet row 0", "rows reordered"],
    ),
    (
        "samples-swapped",
        _confidences(lambda c: _set_cell("sample", 1, 0)(_set_cell("sample", 0, 1)(c))),
        [
            "confidences.parquet row 0",
            "sample 1); expected (score 'Energy()', dataset 'InD', sample 0)",
        ],
    ),
    (
        "confidence-edited",
        _confidences(_set_cell("confidence", 0, -1e9)),
        ["metrics.csv line 2", "the two files disagree", "confidences.parquet"],
    ),
    (
        "confidences-extra-row",
        _confidences(lambda c: pd.concat([c, c.iloc[-1:]], ignore_index=True)),
        ["confidences.parquet: 81 confidences of 'KNN(k=5) @ 1-5, 1-11' on 'MNIST digits'"],
    ),
    (
        "confidences-score-renamed",
        _confidences(lambda c: c.assign(score=c["score"].replace("Energy()", "Energy(t=2)"))),
        ["confidences.parquet: 0 confidences of 'Energy()' on 'InD'"],
    ),
    (
        "confidences-not-parquet",
        lambda folder: (folder / "confidences.parquet").write_bytes(b"not a parquet file"),
        ["Cannot read", "confidences.parquet"],
    ),
    # config.toml
    (
        "config-missing",
        lambda folder: (folder / "config.toml").unlink(),
        ["config.toml missing", "a bundle holds"],
    ),
]


@pytest.mark.parametrize(
    ("tamper", "needles"), [r[1:] for r in TAMPER_ROWS], ids=[r[0] for r in TAMPER_ROWS]
)
def test_tampered_bundles_are_refused_naming_file_field_and_expectation(
    tamper, needles, exported, cache, tmp_path
) -> None:
    _, folder = exported
    shared = _copy(folder, tmp_path)
    tamper(shared)
    with pytest.raises(BundleError) as info:
        to_result(read_bundle(shared), cache)
    message = str(info.value)
    assert str(shared) in message, message  # names the file (its path)
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"
    assert "Traceback" not in message and len(message) < 2_000


def test_a_huge_run_json_is_refused_before_it_is_parsed(exported, tmp_path, monkeypatch) -> None:
    _, folder = exported
    shared = _copy(folder, tmp_path)
    monkeypatch.setattr(bundle_mod, "MAX_JSON_BYTES", 1_000)
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("parsed"))
    with pytest.raises(BundleError, match=r"run.json: [\d,]+ bytes; .* at most 1,000 bytes"):
        read_bundle(shared)


def test_todays_and_earlier_run_json_layouts_read(exported, tmp_path, cache) -> None:
    """What export writes today (and a ``files`` list instead of the table), and the earliest
    run.json: no predictions, fingerprint, shared seconds, written_at or files."""
    result, folder = exported
    for n, edit in enumerate(
        [
            lambda i: None,
            lambda i: i.update(files=sorted(i["files"])),
            lambda i: i.update(files=[{"name": k, **v} for k, v in i["files"].items()]),
            lambda i: (
                [i.pop(k) for k in ("ind_predictions", "images_sha256", "written_at", "files")]
                + [op.pop("shared_seconds") for op in i["timings"]["operations"]]
            ),
        ]
    ):
        (tmp_path / str(n)).mkdir()
        shared = _copy(folder, tmp_path / str(n))
        _run_json(edit)(shared)
        back = to_result(read_bundle(shared), cache)
        np.testing.assert_array_equal(back.evals, result.evals)
        np.testing.assert_array_equal(back.ind_predictions, result.ind_predictions)
        assert back.accuracy == result.accuracy


# ---------------------------------------------------------------------------- trust
HUBCONF = (
    "import pathlib\n"
    "pathlib.Path(__file__).with_name('imported.marker').touch()\n\n\n"
    "def tiniest():\n"
    "    from ood_core.hub import load_model\n\n"
    "    return load_model('bundled', 'tiniest')\n"
)


def _someone_hub(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A hub repo someone else wrote (its hubconf.py leaves a marker when it runs): a local
    folder, or a GitHub repo already in the torch.hub cache."""
    if kind == "local_dir":
        folder, repo = tmp_path / "someone_hub", str(tmp_path / "someone_hub")
    else:
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
        folder, repo = tmp_path / "torch_hub" / "someone_models_main", "someone/models"
    folder.mkdir(parents=True)
    (folder / "hubconf.py").write_text(HUBCONF)
    return repo, folder


@pytest.mark.parametrize("flag", ["true", None, '"yes"'], ids=["asks-trust", "silent", "yes"])
@pytest.mark.parametrize("kind", ["local_dir", "cached_github"])
def test_a_bundle_asking_for_trust_never_gets_it(
    kind, flag, exported, cache, tmp_path, monkeypatch
) -> None:
    """config.toml with [model] repo = <someone's repo> and trust_repo = true: opened without
    trust_repo=True it is refused before the repo's code runs; with it (the caller's consent)
    it opens."""
    monkeypatch.setattr(hub, "network_available", lambda *a, **k: pytest.fail("network tried"))
    result, folder = exported
    repo, hub_dir = _someone_hub(kind, tmp_path, monkeypatch)
    shared = _copy(folder, tmp_path)
    text = (shared / "config.toml").read_text()
    asked = f'repo = "{repo}"' + (f"\ntrust_repo = {flag}" if flag else "")
    (shared / "config.toml").write_text(text.replace('repo = "bundled"', asked, 1))
    if flag == '"yes"':
        with pytest.raises(ConfigError, match=r'\[model\] trust_repo = "yes".*only a request'):
            read_bundle(shared)
    else:
        bundle = read_bundle(shared)
        assert not bundle.config.trust_repo
        assert bundle.config.trust_requested is (flag == "true")
        with pytest.raises(hub.UntrustedRepoError, match=re.escape(f"'{repo}'")):
            to_result(bundle, cache)
        with pytest.raises(hub.UntrustedRepoError):  # the flag set in code is not read either
            to_result(bundle.__class__(**{**bundle.__dict__, "config": _trusting(bundle)}), cache)
    assert not (hub_dir / "imported.marker").exists(), "the repo's code ran"
    if flag != '"yes"':
        cache.models.pop((repo, "tiniest"), None)  # loaded by an earlier row: load it here
        back = to_result(read_bundle(shared), cache, trust_repo=True)  # the caller's consent
        assert (hub_dir / "imported.marker").exists()
        np.testing.assert_array_equal(back.evals, result.evals)
        with pytest.raises(hub.UntrustedRepoError):  # cached now, still not for an untrusted call
            to_result(read_bundle(shared), cache)


def _trusting(bundle: bundle_mod.Bundle) -> RunConfig:
    import dataclasses

    return dataclasses.replace(bundle.config, trust_repo=True)
