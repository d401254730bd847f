"""Shared neighbour search (:mod:`ood_core.scores.search`): the sharded exact bank equals one flat
index, and KNN's opt-in approximate indexes (``index``, ``nprobe``) with their measured recall."""

from __future__ import annotations

import warnings

import faiss
import numpy as np
import pytest
import torch
from torch import nn

import ood_core.scores.knn as knn_module
from ood_core.diagnostics import OodLensWarning
from ood_core.evaluation import Evaluation
from ood_core.scores import KNN
from ood_core.scores.search import (
    SHARD_ALIGN,
    ShardedFlatIndex,
    flat_index,
    recall_at_k,
    search,
    self_query_search,
    sharded_flat_index,
)


def tied_bank(n: int, d: int, seed: int = 0) -> np.ndarray:
    """``n`` float32 rows of ``d`` dims drawn from ``n // 10`` distinct rows: ties everywhere."""
    rng = np.random.default_rng(seed)
    distinct = rng.standard_normal((n // 10, d)).astype(np.float32)
    return distinct[rng.integers(0, len(distinct), n)]


def flat(x: np.ndarray, metric: str) -> faiss.Index:
    index = faiss.IndexFlatL2(x.shape[1]) if metric == "l2" else faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


# ---------------------------------------------------------------------------- sharded bank
K_VALUES = (1, 15, 100, 1500, 3200)
"""faiss' single-best, heap and reservoir selections; k above a shard (1,024 rows); k > n."""


def queries(x: np.ndarray, n_query: int) -> np.ndarray:
    """Half bank rows (their duplicates tie), half fresh rows."""
    rng = np.random.default_rng(1)
    fresh = rng.standard_normal((n_query - n_query // 2, x.shape[1]))
    return np.concatenate([x[: n_query // 2], fresh]).astype(np.float32)


def sharded(x: np.ndarray, metric: str) -> ShardedFlatIndex:
    index = ShardedFlatIndex(x.shape[1], metric, shard_rows=1000)
    index.add(x[:1500])  # added in two parts: the second fills the second shard up first
    index.add(x[1500:])
    assert index.shard_rows == SHARD_ALIGN
    assert [s.ntotal for s in index.shards] == [1024, 1024, 952]
    assert index.ntotal == len(x)
    np.testing.assert_array_equal(index.reconstruct_n(1000, 100), x[1000:1100])
    return index


@pytest.fixture(params=["direct", "blas"])
def kernel(request):
    """faiss' distance kernel, forced: its own loops, or BLAS (it picks one from the query batch's
    size and dims, ``faiss.cvar.distance_compute_blas_threshold``)."""
    before = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 2**30 if request.param == "direct" else 0
    yield request.param
    faiss.cvar.distance_compute_blas_threshold = before


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("tied", [False, True])
def test_sharded_search_equals_one_flat_index(metric, tied, kernel):
    """Same float32 distances and ids; with inner products and ties (exact duplicate rows), the
    ids too except where tied rows straddle the k-th place (faiss keeps tied rows by its heap's
    scan order there): those rows hold other rows of the same tie."""
    x = tied_bank(3000, 64) if tied else np.random.default_rng(0).standard_normal((3000, 64))
    x = x.astype(np.float32)
    q = queries(x, 40)
    one, index = flat(x, metric), sharded(x, metric)
    for k in K_VALUES:
        want_d, want_i = one.search(q, k)
        got_d, got_i = index.search(q, k)
        np.testing.assert_array_equal(got_d, want_d, err_msg=f"{metric} k={k}")
        if metric == "l2" or not tied or k >= len(x):
            np.testing.assert_array_equal(got_i, want_i, err_msg=f"{metric} k={k}")
            continue
        after = one.search(q, k + 1)[0][:, k]
        straddle = after == want_d[:, -1]
        assert straddle.any()  # the bank's ties do reach the k-th place
        np.testing.assert_array_equal(got_i[~straddle], want_i[~straddle])
        # elsewhere: distinct rows, and the same rows up to exact duplicates
        assert (np.diff(np.sort(got_i, 1), axis=1) > 0).all()
        bx = x.astype(np.float64)
        got_rows = np.sort(bx[got_i[straddle]].sum(-1), 1)
        want_rows = np.sort(bx[want_i[straddle]].sum(-1), 1)
        np.testing.assert_array_equal(got_rows, want_rows)


def test_sharded_index_serves_the_shared_search_helpers():
    for metric, x in (("l2", tied_bank(2500, 16, seed=2)), ("ip", bank(2500, 16).numpy())):
        x = torch.from_numpy(x)
        one, index = flat_index(x, metric), sharded_flat_index(x, metric, shard_rows=SHARD_ALIGN)
        assert len(index.shards) == 3
        for a, b in zip(
            search(one, x, x[:50], 9, metric), search(index, x, x[:50], 9, metric), strict=True
        ):
            assert torch.equal(a, b)
        for a, b in zip(self_query_search(one, x, 5), self_query_search(index, x, 5), strict=True):
            assert torch.equal(a, b)


def test_sharded_index_refuses_bad_arguments():
    with pytest.raises(ValueError, match="metric"):
        ShardedFlatIndex(4, "cosine")
    with pytest.raises(ValueError, match="shard_rows"):
        ShardedFlatIndex(4, "l2", shard_rows=0)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        ShardedFlatIndex(4).add(np.zeros((3, 5), np.float32))


# ---------------------------------------------------------------------------- recall
def test_exact_search_has_recall_one_even_with_ties():
    x = torch.from_numpy(tied_bank(2000, 8, seed=3))
    for metric in ("l2", "ip"):
        recall, m = recall_at_k(flat_index(x, metric), x, 15, metric)
        assert (recall, m) == (1.0, 1000)


# ---------------------------------------------------------------------------- KNN(index=...)
def bank(n: int = 2000, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def fitted(score: KNN, x: torch.Tensor) -> KNN:
    logits = torch.zeros(len(x), 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score.fit_features({"x": x}, logits, None)
    score.caught = [str(w.message) for w in caught if issubclass(w.category, OodLensWarning)]
    return score


def conformity(score: KNN, q: torch.Tensor) -> torch.Tensor:
    return score.conformity_from_features({"x": q}, torch.zeros(len(q), 3))[:, 0]


def test_exact_index_numbers_are_the_flat_search_as_before():
    x, q = bank(), bank(300, seed=1)
    for metric in ("l2", "ip"):
        default = fitted(KNN(k=15, index_metric=metric), x)
        exact = fitted(KNN(k=15, index_metric=metric, index="exact"), x)
        dist, _ = flat_index(x, metric).search(q.numpy(), 15)
        want = torch.from_numpy(dist[:, -1].astype(np.float64))
        want = -want if metric == "l2" else want
        assert torch.equal(conformity(default, q), want)
        assert torch.equal(conformity(exact, q), want)
        assert exact.recall_ is None and exact.fit_notes == [] and exact.caught == []
        assert isinstance(exact.index_, faiss.IndexFlat)


def test_knn_through_a_network_is_unchanged_by_index_exact():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    x = torch.rand(260, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    confs = []
    for params in ({}, {"index": "exact"}):
        score = KNN(k=5, **params)
        score.layers = ((1, 2),)
        ev = Evaluation.for_net(net, x[:1])
        ev.fit([score], x[:200])
        confs.append(ev.predicted([score], x[200:])[1])
    feats = nn.functional.normalize(net[:2](x).flatten(1), dim=1).detach().numpy()
    dist, _ = flat(feats[:200], "l2").search(feats[200:], 5)
    assert torch.equal(confs[0], confs[1])
    assert torch.equal(confs[0][0], -torch.from_numpy(dist[:, -1].astype(np.float64)))


def test_ivf_reports_its_recall_and_with_every_list_visited_equals_exact():
    x, q = bank(), bank(300, seed=1)
    exact = fitted(KNN(k=15), x)
    coarse = fitted(KNN(k=15, index="IVF16,Flat", nprobe=1), x)
    assert 0.0 <= coarse.recall_ <= 1.0
    (note,) = coarse.fit_notes
    assert note.startswith("KNN: index 'IVF16,Flat' (nprobe=1): recall@15 ")
    assert note.endswith("against exact search on 1,000 calibration queries")
    full = fitted(KNN(k=15, index="IVF16,Flat", nprobe=16), x)
    assert full.recall_ == 1.0
    assert full.fit_notes == [
        "KNN: index 'IVF16,Flat' (nprobe=16): recall@15 1.0000 against exact search on 1,000 "
        "calibration queries"
    ]
    assert full.caught == []
    torch.testing.assert_close(conformity(full, q), conformity(exact, q), rtol=1e-5, atol=1e-6)
    above = fitted(KNN(k=15, index="IVF16,Flat", nprobe=64), x)  # clamped to nlist
    assert above.recall_ == 1.0 and "(nprobe=16 (nlist))" in above.fit_notes[0]


def test_inner_product_ivf_with_every_list_visited_equals_exact():
    x, q = bank(), bank(300, seed=1)
    exact = fitted(KNN(k=10, index_metric="ip"), x)
    full = fitted(KNN(k=10, index_metric="ip", index="IVF8,Flat", nprobe=8), x)
    assert full.recall_ == 1.0
    torch.testing.assert_close(conformity(full, q), conformity(exact, q), rtol=1e-5, atol=1e-6)


def test_low_recall_warns_with_the_remedy():
    x = bank(2000, 32)
    score = fitted(KNN(k=15, index="IVF64,Flat", nprobe=1), x)
    assert score.recall_ < knn_module.MIN_RECALL
    (message,) = score.caught
    assert message.startswith("KNN: the approximate index 'IVF64,Flat' (nprobe=1) finds ")
    assert "larger nprobe (now 1, at most nlist = 64)" in message and "index='exact'" in message
    assert torch.isfinite(conformity(score, bank(50, 32, seed=1))).all()


def test_hnsw_sets_ef_search_and_reports_its_recall():
    x = bank()
    score = fitted(KNN(k=15, index="HNSW16", nprobe=64), x)
    assert 0.0 <= score.recall_ <= 1.0
    assert score.fit_notes[0].startswith("KNN: index 'HNSW16' (efSearch=64): recall@15 ")
    assert faiss.downcast_index(score.index_).hnsw.efSearch == 64


@pytest.mark.parametrize("bad", ["IVF16,Flatt", "Bogus", "IVF16,PQ7"])
def test_a_bad_index_string_is_refused_at_fit_naming_the_parameter(bad):
    score = KNN(k=5, index=bad)  # any non-empty string is accepted until the dims are known
    with pytest.raises(ValueError) as info:
        fitted(score, bank())
    message = str(info.value)
    assert message.startswith(f"KNN(k=5, index={bad!r}): parameter 'index' = {bad!r} is not")
    assert "'IVF256,Flat'" in message and "'HNSW32'" in message and "16-dim" in message
    assert not score.fitted


def test_a_bad_index_string_is_refused_before_any_forward_pass(net, data):
    x, labels = data
    score = KNN(k=5, index="IVF4,Nope")
    score.layers = ((1, 2),)
    calls = net.calls
    with pytest.raises(ValueError, match=r"KNN.*parameter 'index' = 'IVF4,Nope'"):
        Evaluation.for_net(net, x[:1]).fit([score], x)
    assert net.calls - calls <= 1  # the tracing pass of for_net at most, no calibration pass


def test_an_ivf_with_too_few_rows_per_list_is_refused():
    with pytest.raises(ValueError, match=r"KNN.*'IVF256,Flat' has 256 inverted lists.*only 500"):
        fitted(KNN(k=5, index="IVF256,Flat"), bank(500))


@pytest.mark.parametrize("bad", ["", "  ", 3, None])
def test_index_must_be_a_non_empty_string(bad):
    with pytest.raises(ValueError, match=r"KNN: parameter 'index' must be 'exact', 'auto' or"):
        KNN(k=5, index=bad)


def test_auto_below_the_threshold_is_exact_and_says_so():
    x, q = bank(), bank(100, seed=1)
    score = fitted(KNN(k=15, index="auto"), x)
    assert score.fit_notes == [
        "KNN: index='auto': exact search (2,000 calibration samples < AUTO_APPROX_ROWS = 200,000)"
    ]
    assert score.recall_ is None and isinstance(score.index_, faiss.IndexFlat)
    assert torch.equal(conformity(score, q), conformity(fitted(KNN(k=15), x), q))


def test_auto_above_the_threshold_picks_an_ivf_and_tunes_nprobe(monkeypatch):
    monkeypatch.setattr(knn_module, "AUTO_APPROX_ROWS", 1000)
    score = fitted(KNN(k=15, index="auto", nprobe=1), bank(2000, 32))
    assert score.fit_notes[0] == (
        "KNN: index='auto': 'IVF179,Flat' (2,000 calibration samples >= AUTO_APPROX_ROWS = "
        "1,000; nlist ~ 4 sqrt(n))"
    )
    assert "raised from nprobe=1 to reach recall 0.99" in score.fit_notes[1]
    assert score.recall_ >= knn_module.AUTO_TARGET_RECALL
    assert score.caught == []


def test_changing_index_or_nprobe_unfits():
    score = fitted(KNN(k=5), bank())
    score.nprobe = 4
    assert not score.fitted
    score = fitted(KNN(k=5), bank())
    score.index = "HNSW32"
    assert not score.fitted and score.config()["index"] == "HNSW32"


def test_queries_whose_visited_lists_hold_fewer_than_k_rows_are_searched_in_all_lists():
    x, q = bank(2000, 8), bank(200, 8, seed=1) * 3  # far from the bank: few rows per probe
    score = fitted(KNN(k=200, index="IVF64,Flat", nprobe=1), x)
    lost = score.index_.search(q.numpy(), 200)[1][:, -1] < 0
    assert lost.any()  # without the fallback these would read faiss' -FLT_MAX padding
    want = conformity(fitted(KNN(k=200), x), q)
    torch.testing.assert_close(conformity(score, q)[lost], want[lost], rtol=1e-5, atol=1e-6)
    assert faiss.extract_index_ivf(score.index_).nprobe == 1  # restored
