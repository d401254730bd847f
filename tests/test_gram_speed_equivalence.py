"""The fast Gram paths (blocks of samples, upper-triangle bands, the per-sample closed form for one
value per channel, the class-sorted calibration) against straightforward implementations."""

from __future__ import annotations

import math

import pytest
import torch

from ood_core.scores import Gram
from ood_core.scores import gram as gram_module
from ood_core.scores.gram import deviation, gram_stats


def reference_stats(
    a: torch.Tensor, order: int, separate: bool = False, dtype=None
) -> torch.Tensor:
    """Per order: powers, batched product, abs, root, then upper-triangle row sums, in ``dtype``
    (``a``'s by default); an infinite coefficient is NaN. ``F^p`` is ``F^(p-1) * F`` as documented:
    ``F ** p`` rounds differently by an ulp, which the products' cancellations amplify."""
    dtype = a.dtype if dtype is None else dtype
    f = a.to(dtype).reshape(a.shape[0], a.shape[1], -1)
    out, fp = [], f
    for p in range(1, order + 1):
        if p > 1:
            fp = fp * f
        g = torch.bmm(fp, fp.transpose(1, 2)).abs() ** (1.0 / p)
        g = torch.where(torch.isinf(g), math.nan, g)
        if separate:
            rows = torch.cat([g.diagonal(dim1=1, dim2=2), g.triu(1).sum(2)], dim=1)
        else:
            rows = g.triu().sum(2)
        out.append(rows.double())
    return torch.stack(out, dim=1)


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


CASES = {
    "conv (48 ch, 7x7)": randn(40, 48, 7, 7),
    "conv (6 ch, 4x4)": randn(40, 6, 4, 4, seed=1),
    "pooled (80 ch, L=1)": randn(40, 80, 1, 1, seed=2),
    "one channel (2-D)": randn(40, 1, 30, seed=3),
    "single value (1, 1)": randn(40, 1, 1, seed=4),
    "overflow conv": randn(40, 40, 3, 3, seed=5, scale=300),
    "overflow L=1": randn(40, 40, 1, 1, seed=6, scale=300),
    "overflow 2-D": randn(40, 1, 30, seed=7, scale=300),
}


@pytest.mark.parametrize("dtype", [None, torch.float64], ids=["input", "float64"])
@pytest.mark.parametrize("separate", [False, True], ids=["rows", "separate_diagonal"])
@pytest.mark.parametrize("name", list(CASES))
def test_gram_stats_equal_the_reference(name, separate, dtype):
    a = CASES[name]
    ours = gram_stats(a, 8, separate, dtype)
    ref = reference_stats(a, 8, separate, dtype)
    assert ours.shape == ref.shape and ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0, equal_nan=True)
    if name.startswith("overflow") and dtype is None:  # the float32 NaN rows are kept
        assert ours[:, -1].isnan().any() and ours[:, 0].isfinite().all()


@pytest.mark.parametrize("separate", [False, True])
def test_rank_one_underflow_keeps_the_products_zeros(separate):
    """Tiny values: the high orders underflow float32 for some samples (exact zeros, as with the
    products) while the closed form serves the others. The float32 roots themselves are only
    good to ~1e-6 there (the exponent 1/p rounded to float32, times ln x ~ -40)."""
    a = torch.rand(64, 80, 1, 1, generator=torch.Generator().manual_seed(8)) * 1e-3
    ours, ref = gram_stats(a, 8, separate), reference_stats(a, 8, separate)
    assert torch.equal(ours == 0, ref == 0) and (ref == 0).any()
    torch.testing.assert_close(ours, ref, rtol=2e-6, atol=0)


def test_rank_one_nan_and_inf_activations_follow_the_products():
    a = randn(6, 5, 1, 1, seed=9)
    a[1, 2] = math.nan
    a[3, 0] = math.inf
    ours, ref = gram_stats(a, 4), reference_stats(a, 4)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0, equal_nan=True)
    assert ours[1].isnan().any() and ours[[0, 2, 4, 5]].isfinite().all()


@pytest.mark.parametrize(
    ("name", "rtol"),
    [("pooled (80 ch, L=1)", 1e-12), ("overflow L=1", 1e-12), ("overflow conv", 1e-6)],
)
def test_each_sample_is_independent_of_the_batch(name, rtol):
    """One value per channel: the closed form or the products is chosen per sample, not per batch
    (a product of one value each is exact); larger products may round differently with the
    batch size in the BLAS, by an ulp."""
    a = CASES[name]
    whole = gram_stats(a, 6, True)
    for k in (0, 7, len(a) - 1):
        alone = gram_stats(a[k : k + 1], 6, True)
        torch.testing.assert_close(alone, whole[k : k + 1], rtol=rtol, atol=0, equal_nan=True)


def test_blocks_and_bands_do_not_change_the_numbers(monkeypatch):
    a = randn(23, 64, 3, 3, seed=10, scale=3)
    banded = gram_stats(a, 8, True)
    monkeypatch.setattr(gram_module, "SAMPLE_BLOCK_BYTES", 1)  # one sample per block
    monkeypatch.setattr(gram_module, "SPLIT_BANDS", 1)  # the whole product
    torch.testing.assert_close(gram_stats(a, 8, True), banded, rtol=1e-6, atol=0, equal_nan=True)
    ref = reference_stats(a, 8, True)
    torch.testing.assert_close(banded, ref, rtol=1e-6, atol=0, equal_nan=True)


# ---------------------------------------------------------------- calibration
def reference_fit(score: Gram, features: dict, logits: torch.Tensor, labels: torch.Tensor):
    """Boolean masks per class, nanquantile per class, deviation sums per class."""
    n, n_classes = logits.shape
    groups = logits.argmax(1) if score.calib_labels == "pred" else labels
    members = [groups == c for c in range(n_classes)]
    counts = [int(m.sum()) for m in members]
    q = torch.tensor([score.cut_off, 1 - score.cut_off], dtype=torch.float64)
    bounds, expected = {}, {}
    for key, stats in features.items():
        flat = stats.flatten(1).double()
        low = torch.full((n_classes, flat.shape[1]), math.inf, dtype=torch.float64)
        high = torch.full_like(low, -math.inf)
        pooled = flat.nanquantile(q, dim=0)
        for c in range(n_classes):
            if score.class_fallback == "pooled" and counts[c] < 2:  # noqa: PLR2004
                low[c], high[c] = pooled
            elif counts[c]:
                low[c], high[c] = flat[members[c]].nanquantile(q, dim=0)
        total = torch.zeros((), dtype=torch.float64)
        for c in range(n_classes):
            if counts[c]:
                total += deviation(flat[members[c]], low[c], high[c]).sum()
        bounds[key], expected[key] = (low, high), total / n
    return bounds, expected


@pytest.mark.filterwarnings("ignore::ood_core.diagnostics.OodLensWarning")
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"cut_off": 0.3},
        {"calib_labels": "true"},
        {"calib_labels": "true", "class_fallback": "pooled"},
    ],
)
def test_fit_equals_the_per_class_reference_bit_for_bit(params):
    g = torch.Generator().manual_seed(11)
    n, n_classes = 300, 6
    features = {
        "1-1": torch.rand(n, 3, 8, generator=g, dtype=torch.float64) * 5,
        "1-2": torch.rand(n, 2, 4, generator=g, dtype=torch.float64),
    }
    features["1-2"][::7, 1] = math.nan  # NaN statistics (overflow) in some samples
    logits = torch.randn(n, n_classes, generator=g, dtype=torch.float64)
    logits[:, 4] -= 10  # class 4 is never predicted
    labels = torch.randint(0, n_classes, (n,), generator=g)
    labels[labels == 5] = 0
    labels[3] = 5  # class 5 has a single labelled sample, class 4 none below
    labels[labels == 4] = 1
    score = Gram(**params)
    score.layers = ((1, 1), (1, 2))
    score.fit_features(features, logits, labels)
    bounds, expected = reference_fit(score, features, logits, labels)
    same = {"rtol": 0, "atol": 0, "equal_nan": True}
    for key in features:
        torch.testing.assert_close(score.bounds[key][0], bounds[key][0], **same)
        torch.testing.assert_close(score.bounds[key][1], bounds[key][1], **same)
        torch.testing.assert_close(score.expected[key], expected[key], **same)
