"""Fits that stream (issue #17): mergeable statistics give the whole-matrix fit's numbers."""

from __future__ import annotations

import pytest
import torch

from ood_core.evaluation import Evaluation
from ood_core.scores import DeepMahalanobis, RelativeMahalanobis, make_score
from ood_core.scores.base import FIT_KINDS
from ood_core.scores.registry import SCORES
from ood_core.scores.statistics import ClassMoments


def _rows(n=500, d=6, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 100  # far from 0: cancellation
    labels = torch.randint(0, c, (n,), generator=g)
    labels[labels == 3] = 2  # class 3 never seen
    return h, labels


def _whole(h, labels, c):
    counts = torch.bincount(labels, minlength=c).double()
    means = torch.zeros(c, h.shape[1], dtype=torch.float64).index_add_(0, labels, h)
    means = means / counts.clamp_min(1)[:, None]
    return counts, means, torch.cov((h - means[labels]).T)


@pytest.mark.parametrize("sizes", [[500], [1] * 20 + [480], [7] * 71 + [3], [250, 250]])
def test_class_moments_in_any_batches_equal_the_whole_matrix_statistics(sizes):
    h, labels = _rows()
    m = ClassMoments(4)
    start = 0
    for b in sizes:
        m.update(h[start : start + b], labels[start : start + b])
        start += b
    counts, means, cov = _whole(h, labels, 4)
    assert torch.equal(m.counts, counts) and m.present().tolist() == [True, True, True, False]
    torch.testing.assert_close(m.means, means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.covariance(), cov, rtol=1e-10, atol=1e-10)


def test_shards_merge_into_the_state_of_the_whole():
    h, labels = _rows(seed=2)
    whole = ClassMoments(4)
    whole.update(h, labels)
    parts = [ClassMoments(4) for _ in range(3)]
    for i, part in enumerate(parts):
        part.update(h[i::3], labels[i::3])  # interleaved shards, as workers would see them
    merged = ClassMoments(4)
    for part in (parts[2], parts[0], parts[1]):  # in any order
        merged.merge(part)
    torch.testing.assert_close(merged.means, whole.means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.covariance(), whole.covariance(), rtol=1e-10, atol=1e-10)
    assert merged.n == whole.n == 500


@pytest.mark.parametrize("cls", [DeepMahalanobis, RelativeMahalanobis])
def test_a_streamed_pinv_fit_equals_the_fit_on_whole_features(cls, net, data):
    x, y = data
    layers = ((1, 1), (1, 3))
    ev = Evaluation.for_net(net, x)
    streamed = cls(inverse="pinv", pooling="mean")
    streamed.layers = layers
    assert streamed.streams_fit() and not cls().streams_fit()
    ex = ev.fit([streamed], x, y, batch_size=7)
    assert ex.features == [{}]  # nothing kept: the statistics were updated batch by batch
    whole = cls(inverse="pinv", pooling="mean")
    whole.bind(ev.recorder, layers)
    full = ev.extract([whole], x, batch_size=60)
    whole.fit_features(full.features[0], full.logits, y)
    (_, got), (_, expected) = ev.confidences([streamed, whole], x)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert streamed.condition_numbers.keys() == whole.condition_numbers.keys()


def test_every_score_declares_how_it_fits():
    for name, cls in SCORES.items():
        assert cls.fit_kind in FIT_KINDS, name
        score = make_score(name, **{p.name: p.default for p in cls.params if p.required})
        assert isinstance(score.streams_fit(), bool)


@pytest.mark.parametrize("name", ["DICE", "fDBD"])
def test_scores_that_need_only_a_mean_stream_it(name, net, data):
    """DICE and fDBD fit from the float64 mean of the head's input, summed batch by batch."""
    x, y = data
    ev = Evaluation.for_net(net, x)
    streamed, whole = make_score(name), make_score(name)
    assert streamed.streams_fit() and type(streamed).fit_kind == "streaming"
    streamed.layers = ((1, 4),)  # the head's input
    ex = ev.fit([streamed], x, y, batch_size=7)
    assert ex.features == [{}]
    whole.bind(ev.recorder, ((1, 4),))
    full = ev.extract([whole], x, batch_size=60)
    whole.fit_features(full.features[0], full.logits, y)
    (_, got), (_, expected) = ev.confidences([streamed, whole], x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- rows grouped by class on disk
def _same(a, b):
    """Equal values, NaN where NaN, same shape and dtype."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    return True


def _class_rows(sizes, max_bytes, group_by="labels", seed=3):
    from ood_core.scores.class_rows import ClassRows

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(200, 2, 5, generator=g, dtype=torch.float64)
    h[17, 1, 3] = float("nan")
    h[90, 0, 0] = float("nan")
    logits = torch.randn(200, 4, generator=g)
    labels = torch.randint(0, 5, (200,), generator=g)  # 4 is no class of the 4-logit network
    state = ClassRows(group_by, max_bytes)
    start = 0
    for b in sizes:
        sl = slice(start, start + b)
        state.update({"a": h[sl], "b": h[sl, 0] * 2}, logits[sl], labels[sl])
        start += b
    return state, h, logits, labels


@pytest.mark.parametrize("max_bytes", [float("inf"), 1, 3000])
@pytest.mark.parametrize("sizes", [[200], [7] * 28 + [4], [1] * 10 + [190]])
def test_class_rows_in_any_batches_hold_each_class_in_order(sizes, max_bytes):
    state, h, logits, labels = _class_rows(sizes, max_bytes)
    assert state.spilled == (max_bytes != float("inf"))
    assert state.n == 200 and state.class_counts() == torch.bincount(labels)[:4].tolist()
    for c in range(4):
        assert _same(state.rows("a", c), h[labels == c])
        assert _same(state.rows("b", c), h[labels == c, 0] * 2)
    assert _same(state.rows("a", -1), h[labels == 4])  # no class: apart
    assert len(state.all_rows("a")) == 200
    assert state.nan_rows == {"a": 2, "b": 1}
    assert state.nan_columns["a"].nonzero().flatten().tolist() == [0, 8]
    folder = state.folder
    state.close()
    assert folder is None or not folder.exists()  # the spilled files are removed


def test_class_rows_by_prediction_and_merged_shards_equal_the_whole():
    whole, h, logits, _ = _class_rows([200], float("inf"), group_by="pred")
    first, *_ = _class_rows([50] * 2, 1, group_by="pred")  # rows 0..99, spilled
    from ood_core.scores.class_rows import ClassRows

    second = ClassRows("pred", 1)
    second.update({"a": h[100:], "b": h[100:, 0] * 2}, logits[100:], torch.zeros(100))
    first.merge(second)
    for c in range(4):
        expected = h[logits.argmax(1) == c]
        assert _same(whole.rows("a", c), expected)
        assert _same(first.rows("a", c), expected)
    assert first.n == 200 and first.nan_rows == whole.nan_rows


def test_a_spilling_stream_fits_gram_exactly_as_whole_features(net, data, monkeypatch):
    """Gram's bands and expected deviations from rows streamed batch by batch and spilled to
    disk are those of the whole matrix, bit for bit; the pass keeps no feature."""
    from ood_core.scores import Gram, class_rows

    monkeypatch.setattr(class_rows, "SPILL_BYTES", 1000)  # spill after a few batches
    x, y = data
    ev = Evaluation.for_net(net, x)
    for params in ({}, {"calib_labels": "true", "class_fallback": "pooled", "cut_off": 0.2}):
        streamed, whole = Gram(**params), Gram(**params)
        assert streamed.streams_fit() and type(streamed).fit_kind == "class-rows"
        streamed.layers = ((1, 1), (1, 3))
        ex = ev.fit([streamed], x, y, batch_size=7)
        assert ex.features == [{}]
        whole.bind(ev.recorder, ((1, 1), (1, 3)))
        full = ev.extract([whole], x, batch_size=7)  # the same activations (conv rounding)
        whole.fit_features(full.features[0], full.logits, y)
        for key in whole.bounds:
            assert torch.equal(streamed.bounds[key][0], whole.bounds[key][0])
            assert torch.equal(streamed.bounds[key][1], whole.bounds[key][1])
            assert torch.equal(streamed.expected[key], whole.expected[key])
        (_, got), (_, expected) = ev.confidences([streamed, whole], x)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["Gram", "DICE"])
def test_a_streamed_fit_reads_its_features_from_a_keeping_cache(name, net, data):
    """With a cache that keeps entries (the dashboard's), a streamed score's features are cached
    too: a parameter change refits with no forward pass, to the numbers of a fresh fit."""
    from ood_core.engine import FeatureCache

    x, y = data
    layers = ((1, 1), (1, 3)) if name == "Gram" else ((1, 4),)
    ev = Evaluation.for_net(net, x, cache=FeatureCache(), model_key="tiny")
    first = make_score(name)
    first.layers = layers
    ev.fit([first], x, y, data_key="calib")
    net.calls = 0
    changed = make_score(name, **({"cut_off": 0.2} if name == "Gram" else {"sparsity": 0.5}))
    changed.layers = layers
    ex = ev.fit([changed], x, y, data_key="calib")
    assert ex.n_forward_calls == 0 and net.calls == 0
    fresh = make_score(name, **({"cut_off": 0.2} if name == "Gram" else {"sparsity": 0.5}))
    fresh.layers = layers
    alone = Evaluation.for_net(net, x)
    alone.fit([fresh], x, y)
    ((_, got),) = ev.confidences([changed], x)
    ((_, expected),) = alone.confidences([fresh], x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_a_spill_without_disk_room_is_refused_before_the_pass(monkeypatch):
    import shutil

    from ood_core.budget import BudgetError
    from ood_core.scores.class_rows import check_spill_room

    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=10**9))
    check_spill_room("Gram: its statistics", 2 * 10**8, "use fewer samples")  # room: passes
    with pytest.raises(
        BudgetError,
        match=r"Gram: its statistics needs ~2 GB of disk in .* "
        r"but 1 GB are free; use fewer samples, or point TMPDIR",
    ):
        check_spill_room("Gram: its statistics", 2 * 10**9, "use fewer samples")
