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
from ood_core.engine import ActivationCache, FeatureKey
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


def test_cached_activations_give_the_same_numbers_with_no_forward_pass(net, data):
    x, y = data
    cache = ActivationCache()
    ev = Evaluation.for_net(net, x, cache=cache, model_key="tiny")
    first = _scores()
    ev.fit(first, x, y, data_key="calib", batch_size=16)
    res_first = ev.confidences(first, x, data_key="test", batch_size=16)
    assert cache.misses == 2 and cache.hits == 0
    assert FeatureKey("tiny", "calib", (1, 3)) in cache.entries
    assert FeatureKey("tiny", "test", None) in cache.entries  # the logits
    net.calls = 0
    again = _scores()
    again[2].k = 5  # a changed parameter: refitted from the cached activations
    ev.fit(again, x, y, data_key="calib", batch_size=16)
    res_again = ev.confidences(again, x, data_key="test", batch_size=16)
    assert net.calls == 0 and cache.hits == 2  # no forward pass at all
    for i in (0, 1, 3, 4):
        torch.testing.assert_close(res_again[i][1], res_first[i][1])
    _, k5 = run(net, KNN(k=5), [(1, 3)], x, y, x)  # the same as computed from scratch
    torch.testing.assert_close(res_again[2][1], k5)


def test_a_score_on_already_recorded_layers_costs_no_forward_pass(net, data):
    x, y = data
    ev = Evaluation.for_net(net, x, cache=ActivationCache(), model_key="tiny")
    ev.fit(_scores(), x, y, data_key="calib")
    net.calls = 0
    late = KNN(k=4, act_norm=None)
    late.layers = ((1, 1),)  # recorded for Gram
    ev.fit([late], x, y, data_key="calib")
    ((logits, conf),) = ev.confidences([late], x, data_key="calib")
    assert net.calls == 0
    _, alone = run(net, KNN(k=4, act_norm=None), [(1, 1)], x, y, x)
    torch.testing.assert_close(conf, alone)
    ex = ev.extract([late], x, data_key="calib")
    assert ex.n_forward_calls == 0


def test_no_keys_or_an_unknown_layer_run_the_forward_pass(net, data):
    x, y = data
    cache = ActivationCache()
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
    cache = ActivationCache(max_bytes=60 * 3 * 4 + 100)  # the logits fit, the (1, 1) map does not
    ev = Evaluation.for_net(net, x, cache=cache, model_key="tiny")
    gram = Gram(max_gram_order=2)
    gram.layers = ((1, 1),)
    ev.fit([gram], x, y, data_key="calib")
    assert FeatureKey("tiny", "calib", None) in cache.entries
    assert FeatureKey("tiny", "calib", (1, 1)) not in cache.entries
    assert cache.nbytes <= cache.max_bytes
    net.calls = 0
    ev.fit([gram], x, y, data_key="calib")
    assert net.calls > 0  # recomputed, never a partial result


@pytest.mark.slow
def test_pipeline_rerun_after_a_parameter_change_runs_no_forward_pass(tiniest):
    from ood_core.pipeline import RunCache, ScenarioSpec, ScoreSpec, example_config
    from ood_core.pipeline import run as run_config

    cfg = example_config()
    cfg.n_calibration, cfg.n_test = 200, 100
    cfg.scores = [ScoreSpec("Softmax"), ScoreSpec("KNN", {"k": 5}, ["1-11"])]
    cfg.scenarios = [ScenarioSpec(kind="vertical_flip"), ScenarioSpec(dataset="mnist")]
    cache = RunCache()
    run_config(cfg, cache)
    misses = cache.activations.misses
    cfg.scores[1].params["k"] = 9
    cfg.scores.append(ScoreSpec("Energy"))
    again = run_config(cfg, cache)
    assert cache.activations.misses == misses  # every extraction came from the cache
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
