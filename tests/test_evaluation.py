"""The single-pass engine and the orchestration over it (:mod:`ood_core.evaluation`): one forward
pass per batch for all gradient-free scores, input checks, and the activation cache that makes a
changed or added score cost no forward pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import fit_one as run

from ood_core.core import predicted_confidence
from ood_core.engine import FeatureCache, FeatureKey
from ood_core.evaluation import Evaluation
from ood_core.scores import KNN, Energy, GradNorm, Gram, Softmax


def test_engine_one_forward_per_batch_and_same_results_as_alone(net, data):
    x, y = data

    def make():  # noqa: E306
        return [Softmax(), Energy(), KNN(k=3), Gram(max_gram_order=2), GradNorm()]

    layers = [[], [], [(1, 3)], [(1, 1), (1, 3)], [(1, 5)]]
    together = make()
    for s, lay in zip(together, layers, strict=True):
        s.layers = tuple(lay)
    ev = Evaluation.for_net(net, x)
    ev.fit(together, x, y, batch_size=16)
    net.calls = 0
    res = ev.confidences(together, x, batch_size=16)
    assert net.calls == math.ceil(60 / 16)  # one forward per batch for all five scores
    for s, lay, (_, conf) in zip(make(), layers, res, strict=True):
        _, alone = run(net, s, lay, x, y, x)
        torch.testing.assert_close(conf, alone, msg=repr(s))


def test_engine_rejects_nan_inputs_and_bad_labels(net, data):
    x, y = data
    ev = Evaluation.for_net(net, x)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ev.fit([Softmax()], bad)
    with pytest.raises(ValueError, match=r"calib_labels must have shape \(60,\)"):
        ev.fit([Softmax()], x, y[:10])


def _scores():
    scores = [Softmax(), Energy(), KNN(k=3), Gram(max_gram_order=2), GradNorm()]
    for s, lay in zip(scores, [[], [], [(1, 3)], [(1, 1), (1, 3)], [(1, 5)]], strict=True):
        s.layers = tuple(lay)
    return scores


def test_cached_features_give_the_same_numbers_with_no_forward_pass(net, data):
    x, y = data
    cache = FeatureCache()
    ev = Evaluation.for_net(net, x, cache=cache, model_key="tiny")
    first = _scores()
    ev.fit(first, x, y, data_key="calib", batch_size=16)
    res_first = ev.confidences(first, x, data_key="test", batch_size=16)
    assert cache.misses == 2 and cache.hits == 0
    knn_key = FeatureKey("tiny", "calib", ((1, 3),), first[2].feature_key())
    assert (
        knn_key in cache.entries
        and first[2].feature_key() == "KNN(act_norm=2.0, pooling='flatten')"
    )
    assert FeatureKey("tiny", "test", None, "logits") in cache.entries
    # the features, never the raw activations: Gram keeps (60, 2 orders, 4 channels) statistics
    # of the (60, 4, 6, 6) map of layer 1-1
    gram = cache.entries[FeatureKey("tiny", "calib", ((1, 1), (1, 3)), first[3].feature_key())]
    assert {k: tuple(v.shape) for k, v in gram.items()} == {"1-1": (60, 2, 4), "1-3": (60, 2, 4)}
    net.calls = 0
    again = _scores()
    again[2].k = 5  # a parameter the features do not depend on: refitted from cached features
    ev.fit(again, x, y, data_key="calib", batch_size=16)
    res_again = ev.confidences(again, x, data_key="test", batch_size=16)
    assert net.calls == 0  # GradNorm's own (gradient) passes are not counted as forward calls
    for i in (0, 1, 3, 4):
        torch.testing.assert_close(res_again[i][1], res_first[i][1])
    _, k5 = run(net, KNN(k=5), [(1, 3)], x, y, x)  # the same as computed from scratch
    torch.testing.assert_close(res_again[2][1], k5)


def test_features_that_change_with_a_parameter_are_extracted_again(net, data):
    """A score on a layer recorded only for another score, or with a parameter its features
    depend on, runs one pass (no raw activation is kept); the same score again runs none."""
    x, y = data
    ev = Evaluation.for_net(net, x, cache=FeatureCache(), model_key="tiny")
    ev.fit(_scores(), x, y, data_key="calib")
    net.calls = 0
    late = KNN(k=4, act_norm=None)
    late.layers = ((1, 1),)  # recorded for Gram, whose statistics are all that was kept
    ev.fit([late], x, y, data_key="calib")
    assert net.calls == math.ceil(60 / ev.engine.auto_batch_size(((1, 1),), 36))
    ((logits, conf),) = ev.confidences([late], x, data_key="calib")
    _, alone = run(net, KNN(k=4, act_norm=None), [(1, 1)], x, y, x)
    torch.testing.assert_close(conf, alone)
    net.calls = 0
    again = KNN(k=7, act_norm=None)
    again.layers = ((1, 1),)
    assert ev.extract([again], x, data_key="calib").n_forward_calls == 0 and net.calls == 0
    normed = KNN(k=4, act_norm=2.0)  # act_norm changes the features: a new pass
    normed.layers = ((1, 1),)
    assert ev.extract([normed], x, data_key="calib").n_forward_calls > 0


def test_a_score_whose_extract_reads_its_fit_is_never_cached(net, data):
    from ood_core.scores import ReAct

    x, y = data
    cache = FeatureCache()
    ev = Evaluation.for_net(net, x, cache=cache, model_key="tiny")
    react = ReAct()
    react.layers = ((1, 2),)  # a spatial map: inference clips with the fitted thresholds
    ev.fit([react], x, y, data_key="calib")
    assert react.feature_key() is None
    assert all(k.transform == "logits" for k in cache.entries)
    ((_, conf),) = ev.confidences([react], x, data_key="calib")
    _, alone = run(net, ReAct(), [(1, 2)], x, y, x)
    torch.testing.assert_close(conf, alone)


def test_no_keys_or_an_unknown_layer_run_the_forward_pass(net, data):
    x, y = data
    cache = FeatureCache()
    ev = Evaluation.for_net(net, x, cache=cache, model_key="tiny")
    ev.fit([Softmax()], x, y)  # no data key: nothing cached
    assert not cache.entries
    ev.fit([Softmax()], x, y, data_key="calib")
    knn = KNN(k=3)
    knn.layers = ((1, 3),)
    net.calls = 0
    ev.fit([knn], x, y, data_key="calib")  # (1, 3) was not recorded yet: one pass
    assert net.calls == math.ceil(60 / ev.engine.auto_batch_size(((1, 3),), 36))


def test_cache_budget_skips_what_does_not_fit(net, data):
    x, y = data
    cache = FeatureCache(max_bytes=60 * 3 * 4 + 100)  # the logits fit, Gram's statistics do not
    ev = Evaluation.for_net(net, x, cache=cache, model_key="tiny")
    gram = Gram(max_gram_order=2)
    gram.layers = ((1, 1),)
    ev.fit([gram], x, y, data_key="calib")
    assert FeatureKey("tiny", "calib", None, "logits") in cache.entries
    assert len(cache.entries) == 1 and cache.nbytes <= cache.max_bytes
    net.calls = 0
    ev.fit([gram], x, y, data_key="calib")
    assert net.calls > 0  # recomputed, never a partial result


@pytest.mark.slow
def test_pipeline_rerun_after_a_parameter_change_runs_no_forward_pass(tiniest):
    from ood_core.config import ScenarioSpec, ScoreSpec, example_config
    from ood_core.runner import RunCache
    from ood_core.runner import run as run_config

    cfg = example_config()
    cfg.n_calibration, cfg.n_test = 200, 100
    cfg.scores = [ScoreSpec("Softmax"), ScoreSpec("KNN", {"k": 5}, ["1-11"])]
    cfg.scenarios = [ScenarioSpec(kind="vertical_flip"), ScenarioSpec(dataset="mnist")]
    cache = RunCache()
    run_config(cfg, cache)
    misses = cache.features.misses
    cfg.scores[1].params["k"] = 9
    cfg.scores.append(ScoreSpec("Energy"))
    again = run_config(cfg, cache)
    assert cache.features.misses == misses  # every extraction came from the cache
    t = again.timings
    assert set(t["score"]) == {"KNN(k=9)", "Energy()"}  # only what changed was recomputed
    assert (t["shared_seconds"] == 0).all()  # no forward pass: no shared time
    first = run_config(cfg, RunCache()).timings
    assert (first["shared_seconds"] > 0).all() and (
        first["shared_seconds"] <= first["seconds"]
    ).all()
    fresh = run_config(cfg, RunCache())
    np.testing.assert_allclose(again.confs_ind, fresh.confs_ind)
    for a, b in zip(again.confs_oods, fresh.confs_oods, strict=True):
        np.testing.assert_allclose(a, b)
    assert predicted_confidence  # re-exported helper stays importable


def test_features_past_the_budget_spill_to_the_store_and_serve_a_refit(net, data, tmp_path):
    from ood_core.store import FeatureStore

    x, y = data
    store = FeatureStore(tmp_path / "store")
    cache = FeatureCache(max_bytes=60 * 3 * 4 + 100, store=store)  # only the logits in memory
    ev = Evaluation.for_net(net, x, cache=cache, model_key="tiny")
    first = _scores()
    ev.fit(first, x, y, data_key="calib")
    on_disk = FeatureKey("tiny", "calib", ((1, 1), (1, 3)), first[3].feature_key())
    assert on_disk in store and on_disk not in cache.entries
    assert cache.nbytes <= cache.max_bytes
    net.calls = 0
    again = _scores()
    ev.fit(again, x, y, data_key="calib")
    assert net.calls == 0  # every score's features came from memory or the store
    for a, b in zip(again, first, strict=True):
        if a.fitted and hasattr(a, "bounds"):  # Gram: the same bands from stored statistics
            for k in a.bounds:
                torch.testing.assert_close(a.bounds[k], b.bounds[k], rtol=0, atol=0)
