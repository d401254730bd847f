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
