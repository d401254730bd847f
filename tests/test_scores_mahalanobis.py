"""Mahalanobis family and ViM: closed-form checks against straightforward numpy references."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import TinyConv
from torch import nn

from ood_core.core import predicted_confidence
from ood_core.diagnostics import OodLensWarning
from ood_core.evaluation import Evaluation
from ood_core.hub import BUNDLED_HUB
from ood_core.recorder import Recorder
from ood_core.scores.mahalanobis import (
    COND_MAX,
    DeepMahalanobis,
    MultiMahalanobis,
    RelativeMahalanobis,
    ViM,
    fgm_direction,
    pool_features,
)

L1, L2 = (1, 1), (1, 2)


# ------------------------------------------------------------------------------- numpy references
def np_means(h: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    return np.stack([h[y == c].mean(0) for c in range(n_classes)])


def np_tied_cov(h: np.ndarray, y: np.ndarray, n_classes: int, ddof: int = 1) -> np.ndarray:
    """Within-class covariance; ``ddof=1`` (n - 1, torch.cov's) is what Deep/Relative use,
    ``ddof=0`` (n) what MultiMahalanobis uses."""
    mu = np_means(h, y, n_classes)
    cov = np.zeros((h.shape[1], h.shape[1]))
    for i in range(len(h)):
        d = h[i] - mu[y[i]]
        cov += np.outer(d, d)
    return cov / (len(h) - ddof)


def np_sq_maha(h: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    out = np.zeros((len(h), len(means)))
    for i in range(len(h)):
        for c in range(len(means)):
            d = h[i] - means[c]
            out[i, c] = d @ precision @ d
    return out


def np_deep_maha(h_cal, y, h_test, n_classes, inverse=np.linalg.inv):
    prec = inverse(np_tied_cov(h_cal, y, n_classes))
    return np_sq_maha(h_test, np_means(h_cal, y, n_classes), prec)


def np_global_maha(h_cal, h_test):
    mu = h_cal.mean(0)
    cov = (h_cal - mu).T @ (h_cal - mu) / (len(h_cal) - 1)
    return np_sq_maha(h_test, mu[None], np.linalg.inv(cov))[:, 0]


def fake_features(n=60, d=4, n_classes=3, seed=0):
    g = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    centres = g.normal(0, 3, size=(n_classes, d))
    mix = g.normal(size=(d, d))
    h = centres[y] + g.normal(size=(n, d)) @ mix
    return h, y


def fit_on_features(score, feats: dict, y: np.ndarray, n_classes: int):
    """Fit a score from hand-made features (keys 'd-i' = layer ids) without a network."""
    score.layers = tuple(tuple(int(v) for v in k.split("-")) for k in feats)
    t = {k: torch.from_numpy(v) for k, v in feats.items()}
    logits = torch.zeros(len(y), n_classes, dtype=torch.float64)
    score.fit_features(t, logits, torch.from_numpy(y))
    return score


def conf_on_features(score, feats: dict, n_classes: int, finite: bool = True) -> np.ndarray:
    t = {k: torch.from_numpy(v) for k, v in feats.items()}
    n = len(next(iter(t.values())))
    out = score.conformity_from_features(t, torch.zeros(n, n_classes, dtype=torch.float64))
    assert out.shape == (n, n_classes) and out.dtype == torch.float64
    if finite:
        assert torch.isfinite(out).all()
    return out.numpy()


def fit_quietly(score, feats: dict, y: np.ndarray, n_classes: int) -> list[str]:
    """Fit and return the OodLensWarning messages (a healthy fit returns [])."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_on_features(score, feats, y, n_classes)
    return [str(w.message) for w in caught if issubclass(w.category, OodLensWarning)]


# ------------------------------------------------------------------------------- tiny networks
def conv_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    patterns = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(99))
    x = patterns[y] + 0.5 * torch.randn(n, 1, 6, 6, generator=g)
    return x, y


NORMAL_RANGE = {"input_range": (-20, 20)}
"""Declared by the nets these tests feed standard-normal inputs (not [0, 1] images)."""


@pytest.fixture(scope="module")
def conv_net():
    torch.manual_seed(0)
    net = TinyConv().eval()
    net.ood_lens = NORMAL_RANGE  # conv_data: standard-normal patterns plus noise
    return net


# ------------------------------------------------------------------------------- DeepMahalanobis
def test_deep_mahalanobis_matches_numpy_with_weights():
    h1, y = fake_features(d=4, seed=0)
    h2, _ = fake_features(d=3, seed=1)
    t1, _ = fake_features(n=15, d=4, seed=2)
    t2, _ = fake_features(n=15, d=3, seed=3)
    score = DeepMahalanobis(weights=[1.0, 0.5])
    assert fit_quietly(score, {"1-1": h1, "1-2": h2}, y, 3) == []  # healthy: no warning
    got = conf_on_features(score, {"1-1": t1, "1-2": t2}, 3)
    ref = -(np_deep_maha(h1, y, t1, 3) + 0.5 * np_deep_maha(h2, y, t2, 3))
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)
    assert all(c < 1e4 for c in score.condition_numbers.values())
    # the pseudo-inverse fallback agrees on a well-conditioned covariance
    pinv = fit_on_features(
        DeepMahalanobis(weights=[1.0, 0.5], inverse="pinv"), {"1-1": h1, "1-2": h2}, y, 3
    )
    np.testing.assert_allclose(conf_on_features(pinv, {"1-1": t1, "1-2": t2}, 3), ref, rtol=1e-9)


def test_default_statistics_are_in_the_activations_dtype():
    """inverse='inv' computes means, covariance and LU inverse in float32 for float32 (and half)
    activations, as the reference; pinv in float64."""
    h, y = fake_features(d=4, seed=0)
    t, _ = fake_features(n=10, d=4, seed=2)
    ref = -np_deep_maha(h, y, t, 3)
    for dtype, tol in ((np.float32, 1e-5), (np.float16, 1e-2)):
        score = fit_on_features(DeepMahalanobis(), {"1-1": h.astype(dtype)}, y, 3)
        got = conf_on_features(score, {"1-1": t.astype(dtype)}, 3)
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
    torch_h = torch.from_numpy(h.astype(np.float32))
    prec32 = torch.linalg.inv(
        torch.from_numpy(np_tied_cov(h.astype(np.float32).astype(np.float64), y, 3)).float()
    )
    stored = score.gaussians[0].precision
    assert stored.dtype == torch.float64 and torch_h.dtype == torch.float32
    torch.testing.assert_close(stored.float(), (prec32 + prec32.T) / 2, rtol=1e-2, atol=1e-2)


def test_pooling_flatten_default_and_mean_opt_in(conv_net):
    x, y = conv_data(90, seed=1)
    xt, _ = conv_data(20, seed=2)
    assert DeepMahalanobis().pooling == "flatten" and RelativeMahalanobis().pooling == "flatten"
    a = torch.randn(5, 4, 3, 3)
    assert DeepMahalanobis().layer_features(a).shape == (5, 36)
    assert DeepMahalanobis().layer_features(a).dtype == torch.float32
    torch.testing.assert_close(DeepMahalanobis(pooling="mean").layer_features(a), a.mean((2, 3)))
    assert DeepMahalanobis(inverse="pinv").layer_features(a).dtype == torch.float64
    assert DeepMahalanobis(pooling="mean").layer_features(torch.randn(5, 7)).shape == (5, 7)
    huge = torch.zeros(1, 256, 56, 56)  # 802,816 dims: a 2.3 TiB covariance
    with pytest.raises(
        ValueError,
        match=r"DeepMahalanobis @ 1-3: the activation \(256, 56, "
        r"56\) gives 802,816 feature dims.*use pooling='mean'",
    ):
        DeepMahalanobis().layer_features(huge, (1, 3))
    assert DeepMahalanobis(pooling="mean").layer_features(huge).shape == (1, 256)
    eng = Evaluation.for_net(conv_net, x)
    flat, mean = DeepMahalanobis(), DeepMahalanobis(pooling="mean", inverse="pinv")
    flat.layers = mean.layers = ((1, 2),)  # ReLU output (4, 6, 6): 144 flattened dims
    with pytest.warns(
        OodLensWarning,
        match=r"DeepMahalanobis @ 1-2: 144 feature dimensions "
        r"for 90 samples, covariance singular \(rank <= 87[;)].*try pooling='mean'",
    ):
        eng.fit([flat], x, y)
    assert flat.condition_numbers[(1, 2)] == math.inf
    assert flat.gaussians[0].means.shape == (3, 144)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OodLensWarning)  # the pooled fit is healthy
        eng.fit([mean], x, y)
    ((_, conf),) = eng.confidences([mean], xt)
    with torch.no_grad():
        f_cal, f_t = conv_net.relu_features(x).numpy(), conv_net.relu_features(xt).numpy()
    np.testing.assert_allclose(
        conf.numpy(), -np_deep_maha(f_cal, y.numpy(), f_t, 3), rtol=1e-5, atol=1e-5
    )


def test_deep_mahalanobis_engine_and_seed_style(conv_net):
    x, y = conv_data(90, seed=1)
    xt, _ = conv_data(20, seed=2)
    rec = Recorder(conv_net, input_data=x[:1])
    assert list(rec.layer_table()["type"][1:]) == [
        "Conv2d",
        "ReLU",
        "AdaptiveAvgPool2d",
        "Flatten",
        "Linear",
    ]
    eng = Evaluation(rec)
    score = DeepMahalanobis(pooling="mean", inverse="pinv")
    score.layers = ((1, 2), (1, 5))
    eng.fit([score], x, y, batch_size=32)
    ((logits, conf),) = eng.confidences([score], xt, batch_size=7)
    with torch.no_grad():
        f_cal, f_t = conv_net.relu_features(x).numpy(), conv_net.relu_features(xt).numpy()
        z_cal, z_t = conv_net(x).double().numpy(), conv_net(xt).double().numpy()
    ref = -(np_deep_maha(f_cal, y.numpy(), f_t, 3) + np_deep_maha(z_cal, y.numpy(), z_t, 3))
    assert conf.shape == (20, 3) and conf.dtype == torch.float64
    np.testing.assert_allclose(conf.numpy(), ref, rtol=1e-5, atol=1e-5)
    # the default (flatten; float32 LU inverse, as the reference) on the 4-dim pooled layer
    default = DeepMahalanobis()
    default.layers = ((1, 3), (1, 5))  # AdaptiveAvgPool2d output (4, 1, 1) flattens to 4 dims
    eng.fit([default], x, y)
    ((_, conf_default),) = eng.confidences([default], xt)
    np.testing.assert_allclose(conf_default.numpy(), ref, rtol=1e-4, atol=1e-4)
    # seed-style: Recorder with recorded layers, fit, call
    rnet = Recorder(conv_net, input_data=x[:1])
    rnet.record((1, 2), (1, 5))
    seed = DeepMahalanobis(pooling="mean", inverse="pinv").fit(rnet, x, y)
    logits2, conf2 = seed(xt, batch_size=7)  # float32 convolutions vary with the batch size
    torch.testing.assert_close(conf2, conf)
    at_pred = conf.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
    torch.testing.assert_close(predicted_confidence(logits2, conf2), at_pred)


def test_pool_features_shapes():
    a = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    np.testing.assert_allclose(pool_features(a).numpy(), a.numpy().mean((2, 3)))
    b = torch.randn(2, 3, 5)
    assert pool_features(b).shape == (2, 15) and pool_features(b).dtype == torch.float64


def test_relative_mahalanobis_is_difference_of_numpy_refs():
    h, y = fake_features(d=5, seed=4)
    t, _ = fake_features(n=12, d=5, seed=5)
    for inverse in ("inv", "pinv"):
        score = RelativeMahalanobis(inverse=inverse)
        assert fit_quietly(score, {"1-1": h}, y, 3) == []
        got = conf_on_features(score, {"1-1": t}, 3)
        ref = -(np_deep_maha(h, y, t, 3) - np_global_maha(h, t)[:, None])
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)
        assert set(score.global_condition_numbers) == {(1, 1)}
    # the relative score differs from the plain one by a per-sample (class-independent) shift
    plain = conf_on_features(fit_on_features(DeepMahalanobis(), {"1-1": h}, y, 3), {"1-1": t}, 3)
    shift = got - plain
    np.testing.assert_allclose(shift, np.repeat(shift[:, :1], 3, 1), atol=1e-9)
    assert np.ptp(shift[:, 0]) > 1e-3


def test_readout_closest_is_the_papers_min_distance():
    h1, y = fake_features(d=4, seed=0)
    h2, _ = fake_features(d=3, seed=1)
    t1, _ = fake_features(n=15, d=4, seed=2)
    t2, _ = fake_features(n=15, d=3, seed=3)
    feats, test = {"1-1": h1, "1-2": h2}, {"1-1": t1, "1-2": t2}
    for cls in (DeepMahalanobis, RelativeMahalanobis):
        for inverse in ("inv", "pinv"):
            per_class = conf_on_features(
                fit_on_features(cls(inverse=inverse, weights=[1.0, 2.0]), feats, y, 3), test, 3
            )
            score = fit_on_features(
                cls(inverse=inverse, weights=[1.0, 2.0], readout="closest"), feats, y, 3
            )
            got = conf_on_features(score, test, 3)
            d1, d2 = np_deep_maha(h1, y, t1, 3), np_deep_maha(h2, y, t2, 3)
            if cls is RelativeMahalanobis:
                d1 -= np_global_maha(h1, t1)[:, None]
                d2 -= np_global_maha(h2, t2)[:, None]
            ref = -(d1.min(1) + 2.0 * d2.min(1))  # per-layer closest class, then weighted
            np.testing.assert_allclose(got, np.repeat(ref[:, None], 3, 1), rtol=1e-9)
            assert (got[:, 0] >= per_class.max(1) - 1e-9).all()
    # one layer: the closest readout is the best per-class conformity
    one = {"1-1": h1}
    best = conf_on_features(fit_on_features(DeepMahalanobis(), one, y, 3), {"1-1": t1}, 3).max(1)
    close = fit_on_features(DeepMahalanobis(readout="closest"), one, y, 3)
    np.testing.assert_allclose(conf_on_features(close, {"1-1": t1}, 3)[:, 1], best, rtol=1e-12)


def test_singular_covariance_default_warns_and_pinv_is_finite():
    g = np.random.default_rng(7)
    h = g.normal(size=(8, 20))  # 8 samples, 20 dims -> rank <= 6 within-class covariance
    y = np.arange(8) % 2
    t = g.normal(size=(10, 20))
    for cls in (DeepMahalanobis, RelativeMahalanobis):
        score = cls()
        messages = fit_quietly(score, {"1-1": h}, y, 2)
        assert (
            f"{cls.__name__} @ 1-1: 20 feature dimensions for 8 samples, covariance "
            "singular (rank <= 6)" in messages[0]
        )
        # (N, D) features: no pooling would shrink them, so none is suggested
        assert "calibrate on more samples, or try inverse='pinv'" in messages[0]
        assert "pooling" not in messages[0]
        assert score.condition_numbers[(1, 1)] == math.inf
        if cls is RelativeMahalanobis:  # the global covariance (rank <= 7) is singular too
            assert any("global covariance singular (rank <= 7)" in m for m in messages)
        conf_on_features(score, {"1-1": t}, 2, finite=False)  # rounding noise, but computed
        pinv = cls(inverse="pinv")
        messages = fit_quietly(pinv, {"1-1": h}, y, 2)
        assert pinv.condition_numbers[(1, 1)] > COND_MAX
        assert "covariance singular or ill-conditioned" in messages[0]
        assert "the pseudo-inverse ignores 14 of its 20 directions" in messages[0]
        conf_on_features(pinv, {"1-1": t}, 2)
    score = fit_on_features(DeepMahalanobis(inverse="pinv"), {"1-1": h}, y, 2)
    got = conf_on_features(score, {"1-1": t}, 2)
    pinv = lambda c: np.linalg.pinv(c, rcond=1.0 / COND_MAX, hermitian=True)  # noqa: E731
    np.testing.assert_allclose(got, -np_deep_maha(h, y, t, 2, inverse=pinv), rtol=1e-6)
    assert (got < 0).all()


def test_ill_conditioned_covariance_warns_for_float32():
    g = np.random.default_rng(3)
    y = np.arange(200) % 2
    h = g.normal(size=(200, 3))
    h[:, 2] = h[:, 0] + 1e-4 * g.normal(size=200)  # condition number ~1e8
    score = DeepMahalanobis()
    messages = fit_quietly(score, {"1-1": h.astype(np.float32)}, y, 2)
    assert len(messages) == 1 and "covariance ill-conditioned (condition number" in messages[0]
    assert "float32 arithmetic" in messages[0]
    assert score.condition_numbers[(1, 1)] > 1e6
    assert fit_quietly(DeepMahalanobis(), {"1-1": h}, y, 2) == []  # fine in float64


def test_failed_inversion_gives_minus_inf_as_the_reference():
    """One sample per class: zero covariance, the LU inversion fails, the precision is NaN and
    every conformity -inf (scio's nan_to_num(nan=inf) on the distances); pinv gives 0."""
    h = np.random.default_rng(0).normal(size=(3, 4))
    y = np.array([0, 1, 2])
    score = DeepMahalanobis()
    messages = fit_quietly(score, {"1-1": h}, y, 3)
    assert (
        "covariance singular (rank <= 0; its float64 LU inversion failed), every distance is NaN and "
        "every conformity -inf" in messages[0]
    )
    assert score.gaussians[0].precision.isnan().all()
    got = conf_on_features(score, {"1-1": h + 1}, 3, finite=False)
    assert np.all(got == -np.inf)
    score = fit_on_features(DeepMahalanobis(inverse="pinv"), {"1-1": h}, y, 3)
    got = conf_on_features(score, {"1-1": h + 1}, 3)
    assert np.all(got == 0) and score.condition_numbers[(1, 1)] == float("inf")


def test_absent_class():
    h, y = fake_features(d=3, n_classes=2, seed=8)
    t, _ = fake_features(n=9, d=3, seed=9)
    # default (the reference): NaN mean, conformity -inf at that class only
    score = DeepMahalanobis()
    messages = fit_quietly(score, {"1-1": h}, y, 3)  # class 2 never seen
    assert messages == [
        "DeepMahalanobis: no calibration sample of class(es) [2]: their means "
        "are NaN and their conformity -inf (as in the reference); calibrate with "
        "samples of every class (or use readout='closest')"
    ]
    got = conf_on_features(score, {"1-1": t}, 3, finite=False)
    assert np.all(got[:, 2] == -np.inf)
    np.testing.assert_allclose(got[:, :2], -np_deep_maha(h, y, t, 2), rtol=1e-9)
    # the closest readout skips the absent class
    close = fit_on_features(DeepMahalanobis(readout="closest"), {"1-1": h}, y, 3)
    np.testing.assert_allclose(conf_on_features(close, {"1-1": t}, 3)[:, 2], got[:, :2].max(1))
    # pinv: the sample's largest finite distance
    score = DeepMahalanobis(inverse="pinv")
    assert "their conformity is each sample's lowest" in fit_quietly(score, {"1-1": h}, y, 3)[0]
    got = conf_on_features(score, {"1-1": t}, 3)
    np.testing.assert_allclose(got[:, 2], got[:, :2].min(1))
    np.testing.assert_allclose(got[:, :2], -np_deep_maha(h, y, t, 2), rtol=1e-9)


def test_new_params_validation():
    for name, bad in (("pooling", "max"), ("inverse", "lstsq"), ("readout", "best")):
        with pytest.raises(ValueError, match=f"DeepMahalanobis: parameter '{name}'"):
            DeepMahalanobis(**{name: bad})
    score = RelativeMahalanobis(pooling="mean", inverse="pinv", readout="closest")
    assert (score.pooling, score.inverse, score.readout) == ("mean", "pinv", "closest")
    assert (DeepMahalanobis().inverse, DeepMahalanobis().readout) == ("inv", "predicted")


def test_weights_validation_messages(conv_net):
    with pytest.raises(ValueError, match="DeepMahalanobis: parameter 'weights' must be a non-"):
        DeepMahalanobis(weights=["a"])
    with pytest.raises(ValueError, match="'weights' must be a list"):
        RelativeMahalanobis(weights=1.0)
    x, y = conv_data(30, seed=0)
    score = DeepMahalanobis(weights=[1.0])
    score.layers = ((1, 2), (1, 5))
    with pytest.raises(ValueError, match=r"'weights' has 1 value\(s\) but the score reads 2 layer"):
        Evaluation.for_net(conv_net, x).fit([score], x, y)
    score = MultiMahalanobis(weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="one weight per layer"):
        two = {"1-1": np.ones((4, 2)), "1-2": np.ones((4, 2))}
        fit_on_features(score, two, np.zeros(4, int), 2)


def test_calibration_label_and_size_errors():
    with pytest.raises(ValueError, match="at least 2 calibration samples"):
        fit_on_features(DeepMahalanobis(), {"1-1": np.ones((1, 2))}, np.zeros(1, int), 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        fit_on_features(DeepMahalanobis(), {"1-1": np.ones((4, 2))}, np.array([0, 1, 2, 0]), 2)


# ------------------------------------------------------------------------- input preprocessing
def test_fgm_direction_matches_the_lp_dual_maximiser():
    g = torch.tensor([[3.0, -4.0, 0.0, 1e-9], [0.0, 0.0, 0.0, 0.0], [2.0, -2.0, 1.0, 0.5]])
    inf = fgm_direction(g.clone(), math.inf)
    torch.testing.assert_close(inf, torch.tensor([[1.0, -1, 0, 0], [0, 0, 0, 0], [1, -1, 1, 1]]))
    two = fgm_direction(g.clone(), 2.0)  # the normalised gradient (sub-eps entries dropped)
    torch.testing.assert_close(two[0], torch.tensor([0.6, -0.8, 0.0, 0.0]))
    assert (two[1] == 0).all()
    one = fgm_direction(g.clone(), 1.0)  # mass split over the largest |g|
    torch.testing.assert_close(one[2], torch.tensor([0.5, -0.5, 0.0, 0.0]))
    torch.testing.assert_close(one[0], torch.tensor([0.0, -1.0, 0.0, 0.0]))
    for p in (1.5, 3.0, 7.0):
        d = fgm_direction(g.clone(), p)
        torch.testing.assert_close(d[[0, 2]].norm(p=p, dim=1), torch.ones(2))
        # it maximises <g, d> over the unit L^p ball: <g, d> = ||g||_q
        q = p / (p - 1)
        torch.testing.assert_close((g * d).sum(1)[[0, 2]], g[[0, 2]].norm(p=q, dim=1))
    nan = fgm_direction(torch.tensor([[1.0, math.nan], [1.0, -2.0]]), math.inf)
    torch.testing.assert_close(nan, torch.tensor([[0.0, 0.0], [1.0, -1.0]]))
    assert fgm_direction(torch.zeros(2, 1, 2, 2), 2.0).shape == (2, 1, 2, 2)


def test_epsilon_matches_manual_perturbation_and_helps_ind(conv_net):
    x, y = conv_data(90, seed=3)
    xt, _ = conv_data(30, seed=4)
    eng = Evaluation.for_net(conv_net, x)
    clean = DeepMahalanobis(pooling="mean", inverse="pinv")
    pert = DeepMahalanobis(pooling="mean", inverse="pinv", epsilon=0.02)
    assert pert.needs_input_grad and not clean.needs_input_grad
    for s in (clean, pert):
        s.layers = ((1, 2),)
    eng.fit([clean, pert], x, y)
    assert clean.condition_numbers == pert.condition_numbers  # calibration uses clean inputs
    (_, c0), (_, c1) = eng.confidences([clean, pert], xt, batch_size=8)
    assert not torch.allclose(c0, c1)
    # moving along the gradient lowers the closest-class distance: higher best conformity
    gain = c1.max(1).values - c0.max(1).values
    assert gain.mean() > 0 and (gain > 0).float().mean() > 0.8
    # independent re-implementation: numpy inverse, autograd on the closest-class distance
    with torch.no_grad():
        f_cal = conv_net.relu_features(x).numpy()
    prec = torch.from_numpy(np.linalg.inv(np_tied_cov(f_cal, y.numpy(), 3)))
    means = torch.from_numpy(np_means(f_cal, y.numpy(), 3))
    xg = xt.clone().requires_grad_(True)
    diff = conv_net.relu_features(xg)[:, None, :] - means[None]
    d2 = torch.einsum("ncd,de,nce->nc", diff, prec, diff)
    closest = d2.gather(1, d2.detach().argmin(1, keepdim=True)).sum()
    (grad,) = torch.autograd.grad(closest, xg)
    step = -grad.sign() * (grad.abs() > torch.finfo(grad.dtype).eps)  # sub-eps entries: no step
    with torch.no_grad():
        diff = conv_net.relu_features(xt + 0.02 * step)[:, None, :] - means[None]
        ref = -torch.einsum("ncd,de,nce->nc", diff, prec, diff)
    torch.testing.assert_close(c1, ref, rtol=1e-5, atol=1e-5)
    # the default (flatten, float32 LU inverse) on the pooled (1, 3) layer: same numbers
    default = DeepMahalanobis(epsilon=0.02)
    default.layers = ((1, 3),)
    eng.fit([default], x, y)
    ((_, c3),) = eng.confidences([default], xt)
    torch.testing.assert_close(c3, ref, rtol=1e-3, atol=1e-3)
    # relative variant and L2 steps run, stay finite and also move the scores
    rel = RelativeMahalanobis(epsilon=0.02, fgm_norm=2.0, pooling="mean")
    rel.layers = ((1, 2), (1, 5))
    eng.fit([rel], x, y)
    ((_, c2),) = eng.confidences([rel], xt)
    assert torch.isfinite(c2).all() and c2.shape == (30, 3)
    # the recorder's own selection is restored after the gradient passes
    assert eng.recorder.recording == ()


def test_epsilon_with_failed_inversion_warns_and_stays_unperturbed(conv_net):
    x, y = conv_data(3, seed=3)  # one sample per class: NaN precision, NaN gradients
    eng = Evaluation.for_net(conv_net, x)
    score = DeepMahalanobis(epsilon=0.02, pooling="mean")
    score.layers = ((1, 2),)
    with pytest.warns(OodLensWarning, match="LU inversion failed"):
        eng.fit([score], x, y)
    with pytest.warns(
        OodLensWarning,
        match=r"the input gradient is not finite for 4 of 4 "
        "samples.*scored without the epsilon step",
    ):
        ((_, conf),) = eng.confidences([score], conv_data(4, seed=5)[0])
    assert (conf == -math.inf).all()


# ------------------------------------------------------------------------------- MultiMahalanobis
@pytest.mark.parametrize("shrinkage", ["ledoit_wolf", "oas", 0.3, 0.0])
def test_multi_mahalanobis_matches_reference(shrinkage):
    from sklearn.covariance import ledoit_wolf, oas

    h1, y = fake_features(d=6, seed=10)
    h2, _ = fake_features(d=3, seed=11)
    t1, _ = fake_features(n=11, d=6, seed=12)
    t2, _ = fake_features(n=11, d=3, seed=13)
    score = fit_on_features(
        MultiMahalanobis(shrinkage=shrinkage, weights=[2.0, 1.0]), {"1-1": h1, "1-2": h2}, y, 3
    )
    got = conf_on_features(score, {"1-1": t1, "1-2": t2}, 3)
    ref = np.zeros((11, 3))
    for w, h, t in ((2.0, h1, t1), (1.0, h2, t2)):
        mu = np_means(h, y, 3)
        xc = h - mu[y]
        if shrinkage == "ledoit_wolf":
            cov = ledoit_wolf(xc, assume_centered=True)[0]
        elif shrinkage == "oas":
            cov = oas(xc, assume_centered=True)[0]
        else:
            emp = xc.T @ xc / len(xc)
            cov = (1 - shrinkage) * emp + shrinkage * np.trace(emp) / len(emp) * np.eye(len(emp))
        prec = np.linalg.inv(cov)
        own = np.array([(h[i] - mu[y[i]]) @ prec @ (h[i] - mu[y[i]]) for i in range(len(h))])
        ref -= w * (np_sq_maha(t, mu, prec) - own.mean()) / own.std()
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-8)
    if shrinkage == "oas":  # the closest-class readout: per-layer min of the standardised z
        close = fit_on_features(
            MultiMahalanobis(shrinkage=shrinkage, readout="closest"), {"1-1": h1}, y, 3
        )
        one = fit_on_features(MultiMahalanobis(shrinkage=shrinkage), {"1-1": h1}, y, 3)
        best = conf_on_features(one, {"1-1": t1}, 3).max(1)
        np.testing.assert_allclose(
            conf_on_features(close, {"1-1": t1}, 3), np.repeat(best[:, None], 3, 1), rtol=1e-12
        )


def test_multi_mahalanobis_shrinkage_param():
    assert MultiMahalanobis(shrinkage="OAS").shrinkage == "oas"
    assert MultiMahalanobis(shrinkage="0.25").shrinkage == 0.25
    assert MultiMahalanobis().shrinkage == "ledoit_wolf"
    for bad in ("foo", 1.5, -0.1, True):
        with pytest.raises(ValueError, match="MultiMahalanobis: parameter 'shrinkage' must be"):
            MultiMahalanobis(shrinkage=bad)
    # shrinkage makes a singular covariance invertible
    h = np.random.default_rng(0).normal(size=(6, 10))
    score = fit_on_features(MultiMahalanobis(), {"1-1": h}, np.arange(6) % 2, 2)
    assert score.condition_numbers[(1, 1)] < COND_MAX and score.shrinkages[(1, 1)] > 0
    conf_on_features(score, {"1-1": h[:3] * 5}, 2)


# ------------------------------------------------------------------------------- ViM
@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    net.ood_lens = NORMAL_RANGE
    return net


def np_vim(w, b, h_cal, f_cal, h, f, dim):
    o = -np.linalg.pinv(w) @ b
    xc = h_cal - o
    vals, vecs = np.linalg.eigh(xc.T @ xc / len(xc))
    ns = vecs[:, np.argsort(-vals)[dim:]]
    alpha = f_cal.max(1).mean() / np.linalg.norm(xc @ ns, axis=1).mean()
    lse = np.log(np.exp(f).sum(1))
    return lse - alpha * np.linalg.norm((h - o) @ ns, axis=1)


def test_vim_matches_numpy_and_residual(mlp):
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(80, 5, generator=g), 2 * torch.randn(25, 5, generator=g)
    eng = Evaluation.for_net(mlp, x)
    score = ViM()
    score.layers = ((1, 3),)
    eng.fit([score], x)
    ((logits, conf),) = eng.confidences([score], xt)
    assert score.dim_used == 4 and conf.shape == (25, 3)
    torch.testing.assert_close(conf[:, 0], conf[:, 2])  # per sample
    with torch.no_grad():
        h_cal, h = mlp[:2](x).double().numpy(), mlp[:2](xt).double().numpy()
    w, b = mlp[2].weight.detach().double().numpy(), mlp[2].bias.detach().double().numpy()
    ref = np_vim(w, b, h_cal, h_cal @ w.T + b, h, h @ w.T + b, 4)
    np.testing.assert_allclose(conf[:, 0].numpy(), ref, rtol=1e-5, atol=1e-5)
    # residual: zero inside the principal subspace (through the origin o), the norm outside
    inside = score.origin + torch.randn(7, 4, dtype=torch.float64) @ score.principal_space.T
    assert score.residual(inside).abs().max() < 1e-10
    out_dir = torch.randn(7, 4, dtype=torch.float64)
    outside = inside + out_dir @ score.null_space.T
    torch.testing.assert_close(score.residual(outside), out_dir.norm(dim=1))
    np.testing.assert_allclose(score.origin.numpy(), -np.linalg.pinv(w) @ b, atol=1e-6)


def test_vim_validation(mlp):
    x = torch.randn(20, 5)
    eng = Evaluation.for_net(mlp, x)
    score = ViM()
    score.layers = ((1, 2),)
    with pytest.raises(ValueError, match=r"ViM needs the final nn.Linear layer.*is a Tanh"):
        eng.fit([score], x)
    score = ViM(dim=8)
    score.layers = ((1, 3),)
    with pytest.raises(ValueError, match=r"'dim' \(8\) must be smaller than the feature dim"):
        eng.fit([score], x)
    with pytest.raises(ValueError, match="ViM: parameter 'act_norm' must be None"):
        ViM(act_norm=2.0)
    score = ViM()
    score.layers = ((1, 1), (1, 3))
    with pytest.raises(ValueError, match="at most 1 layer"):
        eng.fit([score], x)


# ------------------------------------------------------------------------------- real model
WEIGHTS = BUNDLED_HUB / "weights" / "tiniest.pt"


@pytest.mark.slow
@pytest.mark.skipif(not WEIGHTS.exists(), reason="bundled tiniest weights not trained yet")
def test_real_fashion_mnist_vs_mnist(tiniest, fmnist_calib, fmnist_test, mnist):
    from ood_core.metrics import AUC

    calib, ind, ood = (
        fmnist_calib.subset(500, seed=0),
        fmnist_test.subset(500, seed=0),
        mnist.subset(500, seed=0),
    )
    eng = Evaluation.for_net(tiniest, calib.images)
    # pooled features: flattened, the (80, 7, 7) block has 3,920 dims for 500 samples (singular)
    scores = [
        DeepMahalanobis(pooling="mean"),
        RelativeMahalanobis(pooling="mean"),
        MultiMahalanobis(),
        ViM(),
        DeepMahalanobis(inverse="pinv"),
    ]
    for s in scores[:3] + scores[4:]:
        s.layers = ((1, 10), (1, 11))
    scores[3].layers = ((1, 12),)
    eng.fit(scores, calib.images, calib.labels)
    res_in, res_out = eng.confidences(scores, ind.images), eng.confidences(scores, ood.images)
    for s, (li, ci), (lo, co) in zip(scores, res_in, res_out, strict=True):
        auc = AUC()(predicted_confidence(li, ci), predicted_confidence(lo, co))
        assert float(auc) > 0.75, (s, auc)
