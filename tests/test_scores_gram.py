"""Gram score: reference semantics (channels, float32 overflow, NaN handling, empty classes,
expected deviation) checked against a plain loop implementation, the opt-in values and the
warnings."""

from __future__ import annotations

import enum
import math

import pytest
import torch
from torch import nn

from ood_core.diagnostics import OodLensWarning
from ood_core.evaluation import Evaluation
from ood_core.scores import Gram
from ood_core.scores.gram import deviation, gram_stats


class Net(nn.Module):
    """conv(1->3) -> avgpool(1) -> flatten -> linear(3->4); ids: 1-1 conv (3, 5, 5), 1-2 pool
    (3, 1, 1), 1-3 flatten (3,), 1-4 logits (4,)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.conv(x))))


@pytest.fixture()
def net():
    torch.manual_seed(2)  # predicts classes 0, 1 and 3 on ``data`` (class 2 never)
    return Net().eval()


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(80, 1, 5, 5, generator=g) + 3 * torch.randn(80, 1, 1, 1, generator=g)
    return x, torch.randint(0, 4, (80,), generator=g)


def fit_score(net, score, layers, x, y):
    score.layers = tuple(layers)
    eng = Evaluation.for_net(net, x, input_range="any")  # standard-normal data, not images
    eng.fit([score], x, y)
    return eng


# ---------------------------------------------------------------- a plain loop implementation
def loop_stats(a: torch.Tensor, order: int, separate: bool) -> torch.Tensor:
    """Per sample: channels = dim 1 for 3-D activations, else one channel; float32 products,
    an infinite coefficient is NaN."""
    rows = []
    for sample in a:
        f = sample.reshape(sample.shape[0], -1) if sample.ndim == 3 else sample.reshape(1, -1)
        values = []
        for p in range(1, order + 1):
            g = (f**p) @ (f**p).T
            g = torch.where(torch.isinf(g), torch.nan, g.abs()) ** (1 / p)
            ch = len(g)
            diag = [g[i, i] for i in range(ch)]
            off = [sum((g[i, j] for j in range(i + 1, ch)), torch.tensor(0.0)) for i in range(ch)]
            if separate:
                values += diag + off
            else:
                values += [diag[i] + off[i] for i in range(ch)]
        rows.append(torch.stack(values))
    return torch.stack(rows)


def loop_deviation(v: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Sum over statistics; a non-finite ratio counts as 0."""
    total = torch.zeros(len(v), dtype=torch.float64)
    for s in range(len(v)):
        for k in range(v.shape[1]):
            x, lo, hi = float(v[s, k]), float(low[k]), float(high[k])
            with torch.no_grad():
                if x < lo:
                    r = (lo - x) / abs(lo) if lo != 0 else math.inf
                elif x > hi:
                    r = (x - hi) / abs(hi) if hi != 0 else math.inf
                else:
                    r = 0.0
            total[s] += r if math.isfinite(r) else 0.0
    return total


def loop_gram(calib_acts, calib_groups, n_classes, test_acts, order=2, cut=0.1, separate=False):
    total = torch.zeros(len(test_acts[0]), n_classes, dtype=torch.float64)
    for a_cal, a_test in zip(calib_acts, test_acts, strict=True):
        s_cal, s_test = loop_stats(a_cal, order, separate), loop_stats(a_test, order, separate)
        bands, expected = {}, 0.0
        for c in range(n_classes):
            sel = s_cal[calib_groups == c].double()
            if len(sel):
                bands[c] = (sel.nanquantile(cut, 0), sel.nanquantile(1 - cut, 0))
                expected += float(loop_deviation(sel, *bands[c]).sum())
        expected /= len(s_cal)
        for c in range(n_classes):
            if c in bands:  # a class without calibration samples deviates by 0
                total[:, c] += loop_deviation(s_test.double(), *bands[c]) / expected
    return -total


def recorded(net, layers, x):
    """Logits and the activations of ``layers`` ``[(layer id, module name)]``."""
    acts = {}
    hooks = [
        getattr(net, name).register_forward_hook(lambda m, i, o, k=key: acts.__setitem__(k, o))
        for key, name in layers
    ]
    with torch.no_grad():
        logits = net(x)
    for h in hooks:
        h.remove()
    return logits, [acts[key] for key, _ in layers]


LAYERS = {(1, 1): "conv", (1, 2): "pool", (1, 3): "flat", (1, 4): "fc"}


@pytest.mark.filterwarnings("ignore:Gram. classes .2. have no calibration sample")
@pytest.mark.parametrize(
    ("layers", "separate", "labels"),
    [
        ([(1, 1), (1, 4)], False, "pred"),
        ([(1, 2), (1, 3)], False, "true"),
        ([(1, 1), (1, 2)], True, "pred"),
    ],
)
def test_gram_matches_loop_implementation(net, data, layers, separate, labels):
    x, y = data
    x_test = torch.cat([x[:20], x[:20] * 3, -x[:20]])
    score = Gram(max_gram_order=3, separate_diagonal=separate, calib_labels=labels)
    eng = fit_score(net, score, layers, x, y)
    ((_, conf),) = eng.confidences([score], x_test)
    named = [(lid, LAYERS[lid]) for lid in layers]
    logits, calib_acts = recorded(net, named, x)
    _, test_acts = recorded(net, named, x_test)
    groups = logits.argmax(1) if labels == "pred" else y
    expected = loop_gram(calib_acts, groups, 4, test_acts, order=3, separate=separate)
    torch.testing.assert_close(conf, expected, rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------- statistics
def test_1d_and_2d_activations_are_one_channel():
    f = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])
    score = Gram(max_gram_order=3)
    score.layers = ((1, 1),)
    stats = score.extract(f, {(1, 1): f})["1-1"]
    assert stats.shape == (2, 3, 1)
    for p in (1, 2, 3):  # |sum_k f_k^(2p)|^(1/p) = ||f||_{2p}^2
        torch.testing.assert_close(stats[:, p - 1, 0], f.double().norm(p=2 * p, dim=1) ** 2)
    two_d = f.reshape(1, 2, 3)
    stats2 = score.extract(f[:1], {(1, 1): two_d})["1-1"]
    assert stats2.shape == (1, 3, 1)
    for p in (1, 2, 3):
        torch.testing.assert_close(stats2[0, p - 1, 0], f.double().flatten().norm(p=2 * p) ** 2)


def test_4d_per_sample_activations_are_rejected():
    score = Gram()
    score.layers = ((1, 1),)
    with pytest.raises(ValueError, match=r"Gram @ 1-1: per-sample activations must be 1-D"):
        score.extract(torch.zeros(2, 3), {(1, 1): torch.zeros(2, 2, 2, 2, 2)})


def test_rank_one_closed_form_equals_products_and_falls_back_on_overflow():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 6, 1, 1, generator=g)
    fast = gram_stats(a, 4)
    products = loop_stats(a, 4, separate=False).double().reshape(5, 4, 6)
    torch.testing.assert_close(fast, products, rtol=1e-5, atol=1e-6)
    big = a * 1e4  # (1e4)^16 overflows float32: NaN as with plain float32 products
    stats = gram_stats(big, 8)
    assert stats[:, :3].isfinite().all() and stats[:, -1].isnan().any()
    assert gram_stats(big, 8, dtype=torch.float64).isfinite().all()


def test_nan_coefficient_poisons_only_its_rows():
    a = torch.tensor([[[1e30, 1.0], [1.0, 1.0], [2.0, 0.0]]])  # (1, 3 channels, 2)
    stats = gram_stats(a, 2)
    # order 2: channel 0's coefficients with itself and the others overflow -> NaN row 0 only
    assert stats[0, 1, 0].isnan() and stats[0, 1, 1:].isfinite().all()
    torch.testing.assert_close(stats[0, 1, 2], torch.tensor(16.0**0.5, dtype=torch.float64))


def test_deviation_non_finite_ratios_count_as_zero():
    low = torch.tensor([0.0, 0.0, math.inf, math.nan, 2.0])
    high = torch.tensor([0.0, 1.0, -math.inf, math.nan, 4.0])
    v = torch.tensor([3.0, 3.0, 5.0, 1.0, math.nan])
    torch.testing.assert_close(deviation(v, low, high), torch.tensor([0.0, 2.0, 0.0, 0.0, 0.0]))


# ---------------------------------------------------------------- calibration edge cases
def fit_on_features(score, stats, logits, labels=None):
    score.layers = ((1, 1),)
    score.fit_features({"1-1": stats}, logits, labels)
    return score


def onehot_logits(groups, n_classes):
    return torch.nn.functional.one_hot(groups, n_classes).double()


def test_empty_class_is_maximally_conforming_and_warns():
    g = torch.Generator().manual_seed(0)
    stats = torch.rand(40, 2, 3, generator=g, dtype=torch.float64) + 1
    groups = torch.arange(40) % 2  # class 2 never predicted
    with pytest.warns(OodLensWarning, match=r"classes \[2\] have no calibration sample predicted"):
        score = fit_on_features(Gram(), stats, onehot_logits(groups, 3))
    test = stats * 5
    conf = score.conformity_from_features({"1-1": test}, onehot_logits(groups, 3))
    assert (conf[:, 2] == 0).all() and (conf[:, :2] < 0).all()
    with pytest.warns(OodLensWarning, match=r"use the band of all calibration samples"):
        pooled = fit_on_features(Gram(class_fallback="pooled"), stats, onehot_logits(groups, 3))
    conf_p = pooled.conformity_from_features({"1-1": test}, onehot_logits(groups, 3))
    torch.testing.assert_close(conf_p[:, :2], conf[:, :2])
    low, high = stats.flatten(1).quantile(0.1, 0), stats.flatten(1).quantile(0.9, 0)
    expected = -deviation(test.flatten(1), low, high).sum(1) / pooled.expected["1-1"]
    torch.testing.assert_close(conf_p[:, 2], expected)


def test_single_sample_class_warns_band_is_a_point():
    stats = torch.arange(1, 12, dtype=torch.float64).reshape(11, 1, 1)
    groups = torch.tensor([0] * 10 + [1])
    with pytest.warns(OodLensWarning, match=r"classes \[1\] have a single calibration sample"):
        score = fit_on_features(Gram(calib_labels="true"), stats, onehot_logits(groups, 2), groups)
    low, high = score.bounds["1-1"]
    assert low[1, 0] == high[1, 0] == 11


@pytest.mark.filterwarnings("ignore:Gram. classes .1. have no calibration sample")
def test_zero_expected_deviation_gives_minus_inf_and_warns():
    stats = torch.ones(10, 1, 2, dtype=torch.float64)
    logits = onehot_logits(torch.zeros(10, dtype=torch.long), 2)
    with pytest.warns(OodLensWarning, match=r"expected deviation 0\), so every conformity is -inf"):
        score = fit_on_features(Gram(), stats, logits)
    conf = score.conformity_from_features(
        {"1-1": torch.cat([stats[:2], stats[:2] * 2])}, logits[:4]
    )
    # 0 / 0 (no deviation) -> NaN -> -inf; x / 0 (a deviation) -> inf -> the most negative float
    assert (conf[:2] == -math.inf).all()
    assert (conf[2:, 0] == -torch.finfo(torch.float64).max).all() and (
        conf[2:, 1] == -math.inf
    ).all()


def test_zero_upper_edge_drops_deviations_and_warns():
    g = torch.Generator().manual_seed(0)
    stats = torch.rand(50, 1, 2, generator=g, dtype=torch.float64) + 1
    stats[:, 0, 1] = 0  # a dead statistic
    logits = onehot_logits(torch.zeros(50, dtype=torch.long), 1)
    with pytest.warns(OodLensWarning, match=r"1 of 2 Gram statistics have an upper band edge at 0"):
        score = fit_on_features(Gram(), stats, logits)
    live = stats[:3].clone()
    dead = live.clone()
    dead[:, 0, 1] = 100.0  # far above the edge 0, yet no deviation
    c_live = score.conformity_from_features({"1-1": live}, logits[:3])
    c_dead = score.conformity_from_features({"1-1": dead}, logits[:3])
    torch.testing.assert_close(c_live, c_dead)


def test_separate_diagonal_structural_zero_does_not_warn(net, data, recwarn):
    x, y = data
    fit_score(net, Gram(max_gram_order=2, separate_diagonal=True), [(1, 1)], x, y)
    assert not [w for w in recwarn if "band edge at 0" in str(w.message)]


def test_overflow_warns_and_float64_precision_avoids_it():
    g = torch.Generator().manual_seed(0)
    acts = torch.rand(30, 4, generator=g) * 300  # ||f||_16^16 > 3.4e38 in float32
    logits = onehot_logits(torch.arange(30) % 2, 2)
    stats32 = Gram(max_gram_order=8)
    stats32.layers = ((1, 1),)
    feats = stats32.extract(logits, {(1, 1): acts})
    assert feats["1-1"][:, -1].isnan().any() and feats["1-1"][:, 0].isfinite().all()
    with pytest.warns(
        OodLensWarning, match=r"Gram statistics of order >= \d are NaN .* precision='float64'"
    ):
        fit_on_features(stats32, feats["1-1"], logits)
    f64 = Gram(max_gram_order=8, precision="float64")
    f64.layers = ((1, 1),)
    assert f64.extract(logits, {(1, 1): acts})["1-1"].isfinite().all()


def test_healthy_fit_does_not_warn(net, data, recwarn):
    x, y = data
    fit_score(net, Gram(max_gram_order=3, calib_labels="true"), [(1, 1), (1, 2), (1, 4)], x, y)
    assert not [w for w in recwarn if issubclass(w.category, OodLensWarning)]


# ---------------------------------------------------------------- constructor
def test_constructor_accepts_reference_forms():
    class LabelKind(enum.StrEnum):
        PRED = "pred"
        TRUE = "true"

    score = Gram(
        max_gram_order=20, cut_off=0.49, separate_diagonal=True, calib_labels=LabelKind.TRUE
    )
    assert score.calib_labels == "true" and score.max_gram_order == 20
    for bad in ({"cut_off": 0.0}, {"cut_off": 0.5}, {"max_gram_order": 0}, {"calib_labels": "x"}):
        with pytest.raises(ValueError, match="Gram: parameter"):
            Gram(**bad)
    defaults = Gram().values
    assert (
        defaults["max_gram_order"],
        defaults["cut_off"],
        defaults["separate_diagonal"],
        defaults["calib_labels"],
    ) == (8, 0.1, False, "pred")
    assert (defaults["precision"], defaults["class_fallback"]) == ("input", "none")
