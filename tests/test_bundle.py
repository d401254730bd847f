"""Export bundles read back (ood_core.bundle): the same result without fitting or scoring, the
notation of earlier exports, and a clear refusal when the data drawn again no longer matches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ood_core.bundle import BundleError, read_bundle, to_result
from ood_core.pipeline import RunCache, RunConfig, ScenarioSpec, ScoreSpec, export, run


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
