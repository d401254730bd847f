"""Pipeline runs from a config: caching per score, scenario handling, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ood_core.config import RunConfig, ScenarioSpec, ScoreSpec
from ood_core.engine import FeatureCache
from ood_core.eval import compute_confidence, compute_metrics, fit_scores
from ood_core.runner import RunCache, run
from ood_core.scores import KNN, Softmax


@pytest.fixture(scope="module")
def small_config() -> RunConfig:
    return RunConfig(
        n_calibration=200,
        n_test=150,
        scores=[ScoreSpec("Softmax"), ScoreSpec("KNN", {"k": 5}, ["1-11"])],
        scenarios=[ScenarioSpec(kind="vertical_flip"), ScenarioSpec(dataset="mnist")],
        metrics=["AUC()", "TPR(max_fpr=0.05)"],
    )


def test_run_equals_the_seed_api_on_the_same_data(small_config):
    cache = RunCache()
    res = run(small_config, cache)
    assert res.ood_titles == ["Vertical flip", "MNIST digits"]
    assert res.evals.shape == (2, 2, 2) and res.confs_ind.shape == (2, 150)
    calib = cache.dataset("fashion_mnist", "calibration", 200, 0)
    ind = cache.dataset("fashion_mnist", "test", 150, 1)
    mnist = cache.dataset("mnist", "test", 150, 2)
    net = cache.model("bundled", "tiniest")
    pairs = ((Softmax(), []), (KNN(k=5), [(1, 11)]))
    fitted = fit_scores(pairs, net, calib.images, calib.labels, progress=False)
    ci, co = compute_confidence(
        fitted, ind=ind.images, oods=(ind.images.flip(2), mnist.images), progress=False
    )
    np.testing.assert_allclose(res.confs_ind, ci.numpy())
    np.testing.assert_allclose(res.evals, compute_metrics(ci, co, res.metrics))
    assert 0.8 < res.accuracy <= 1.0


def test_changing_one_score_parameter_recomputes_only_that_score(small_config):
    cache = RunCache()
    first = run(small_config, cache)
    softmax_fit = first.scores_and_layers[0][0]
    n_entries = len(softmax_fit.timer.entries)
    cfg = RunConfig.from_toml(small_config.to_toml())
    cfg.scores[1].params["k"] = 7
    second = run(cfg, cache)
    assert second.scores_and_layers[0][0] is softmax_fit  # reused, not refitted
    assert len(softmax_fit.timer.entries) == n_entries  # and not re-scored
    assert repr(second.scores_and_layers[1][0]) == "KNN(k=7)"
    np.testing.assert_array_equal(second.confs_ind[0], first.confs_ind[0])
    assert not np.array_equal(second.confs_ind[1], first.confs_ind[1])
    assert set(second.timings["score"]) == {"KNN(k=7)"}


def test_incompatible_data_and_empty_choices_are_explained():
    with pytest.raises(ValueError, match="at least one score"):
        run(RunConfig(scores=[], scenarios=[ScenarioSpec(kind="invert")]))
    with pytest.raises(ValueError, match="at least one OoD scenario"):
        run(RunConfig(scores=[ScoreSpec("Softmax")], scenarios=[]))
    with pytest.raises(ValueError, match=r"reads internal activations"):
        run(
            RunConfig(
                n_calibration=50,
                n_test=50,
                scores=[ScoreSpec("KNN", {"k": 3})],
                scenarios=[ScenarioSpec(kind="invert")],
            )
        )


def test_single_file_ind_data_gives_disjoint_calibration_and_test(tmp_path, fmnist_test):
    x = (fmnist_test.images[:300, 0] * 255).round().to(torch.uint8).numpy()
    np.savez(tmp_path / "ind.npz", images=x, labels=fmnist_test.labels[:300].numpy())
    cfg = RunConfig(
        ind_dataset=str(tmp_path / "ind.npz"),
        n_calibration=200,
        n_test=100,
        scores=[ScoreSpec("Softmax")],
        scenarios=[ScenarioSpec(kind="invert")],
    )
    cache = RunCache()
    res = run(cfg, cache)
    assert len(res.ind) == 100
    with pytest.raises(ValueError, match="cannot draw disjoint subsets of 250 and 100"):
        cfg.n_calibration = 250
        run(cfg, RunCache())


def test_a_fit_note_reaches_the_run_notes(tiniest):
    """KNN's approximate index reports its measured recall in the run (CLI, report, run.json)."""
    cfg = RunConfig(
        n_calibration=200,
        n_test=50,
        scores=[ScoreSpec("KNN", {"k": 5, "index": "IVF8,Flat", "nprobe": 8}, ["1-11"])],
        scenarios=[ScenarioSpec(kind="invert")],
    )
    res = run(cfg)
    (note,) = [n for n in res.notes if "recall@5" in n]
    assert "index 'IVF8,Flat' (nprobe=8): recall@5 1.000" in note  # nprobe = nlist: exhaustive


def test_the_run_progress_only_moves_forward_over_the_whole_run(small_config):
    """One bar over the run: each stage's own fraction mapped into its share (calibration, then
    each dataset by its size), never back to 0 when the next stage starts."""
    said: list[tuple[str, float]] = []
    res = run(small_config, RunCache(), progress=lambda stage, frac: said.append((stage, frac)))
    fracs = [f for _, f in said]
    assert fracs == sorted(fracs) and fracs[0] == 0.0 and fracs[-1] == 1.0
    stages = list(dict.fromkeys(s for s, _ in said))
    assert stages[0] == "Loading model and data" and stages[-1] == "Done"
    # per batch of each pass, then per score after it ("KNN @ 1-11 (2 of 3)")
    calibration = [s for s in stages if s.startswith("Calibration")]
    assert any("forward pass" in s for s in calibration)
    n = len(small_config.scores)
    assert [s for s in calibration if s.endswith(f" of {n})")] == [
        f"Calibration ({n} score(s) to fit): {label} ({i + 1} of {n})"
        for i, label in enumerate(res.score_names)
    ]
    scored = {s.split(":")[0] for s in stages if s.startswith("Scoring ")}
    assert len(scored) == 1 + len(small_config.scenarios)
    first_scoring = next(f for s, f in said if s.startswith("Scoring "))
    assert 0.2 < first_scoring < 0.9  # calibration had its share before


def test_a_new_session_sharing_the_feature_cache_refits_a_changed_k_without_forward_pass(
    small_config,
):
    """The dashboard's reload: a fresh RunCache (a new session) over the process's feature
    cache. A changed KNN k refits from cached features (0 forward calls), to the numbers of a
    run that extracted everything anew."""
    features = FeatureCache()
    first = run(small_config, RunCache(features=features))
    assert first.execution["forward_calls"] > 0
    cfg = RunConfig.from_toml(small_config.to_toml())
    cfg.scores[1].params["k"] = 9
    again = run(cfg, RunCache(features=features))
    fresh = run(cfg, RunCache())
    assert again.execution["forward_calls"] == 0 and again.execution["own_pass_scores"] == []
    assert fresh.execution["forward_calls"] == first.execution["forward_calls"]
    np.testing.assert_array_equal(again.confs_ind, fresh.confs_ind)
    np.testing.assert_array_equal(again.evals, fresh.evals)


def test_a_shared_feature_cache_never_serves_features_of_a_rewritten_file(tmp_path, fmnist_test):
    """Data keys hold the datasets' content fingerprints: the same path and config with other
    pixels run the forward passes again and give the numbers of the new pixels."""
    path = tmp_path / "ind.npz"
    x = (fmnist_test.images[:300, 0] * 255).round().to(torch.uint8).numpy()
    y = fmnist_test.labels[:300].numpy()
    np.savez(path, images=x, labels=y)
    cfg = RunConfig(
        ind_dataset=str(path),
        n_calibration=200,
        n_test=100,
        scores=[ScoreSpec("KNN", {"k": 5}, ["1-11"])],
        scenarios=[ScenarioSpec(kind="invert")],
    )
    features = FeatureCache()
    before = run(cfg, RunCache(features=features))
    assert run(cfg, RunCache(features=features)).execution["forward_calls"] == 0
    np.savez(path, images=255 - x, labels=y)  # same path, same size, other content
    after = run(cfg, RunCache(features=features))
    assert after.execution["forward_calls"] == before.execution["forward_calls"]
    np.testing.assert_array_equal(after.confs_ind, run(cfg, RunCache()).confs_ind)
    assert not np.array_equal(after.confs_ind, before.confs_ind)


def test_the_feature_cache_is_safe_to_share_between_threads():
    """Concurrent puts and gets from several threads (the dashboard's sessions) lose no entry
    and never exceed the memory budget."""
    import threading

    from ood_core.engine import FeatureKey

    cache = FeatureCache(max_bytes=64 * 40)  # 40 entries of one (4, 4) float32 tensor (64 B)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(20):
                key = FeatureKey("m", ("d", t), (i,))
                cache.put(key, {"f": torch.full((4, 4), float(t * 100 + i))})
                got = cache.get(key)
                assert got is None or float(got["f"][0, 0]) == t * 100 + i
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(cache.entries) == 40 and cache.nbytes == 64 * 40


def test_scores_with_their_own_passes_are_named_in_the_run_record(small_config):
    """FeatureSqueezing's passes on squeezed inputs are never cached: a rerun from a warm
    feature cache runs no shared forward pass but says FeatureSqueezing ran its own."""
    cfg = RunConfig.from_toml(small_config.to_toml())
    cfg.scores.append(ScoreSpec("FeatureSqueezing", {"squeezers": ["bits:5"]}))
    features = FeatureCache()
    first = run(cfg, RunCache(features=features))
    name = repr(first.scores_and_layers[2][0])
    assert name.startswith("FeatureSqueezing(") and first.execution["own_pass_scores"] == [name]
    again = run(cfg, RunCache(features=features))
    assert again.execution["forward_calls"] == 0
    assert again.execution["own_pass_scores"] == [name]
    np.testing.assert_array_equal(again.confs_ind, first.confs_ind)
