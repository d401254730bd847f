"""Activation-shaping scores (ReAct, ASH, SCALE, DICE, fDBD) against direct re-implementations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch import nn

from ood_core.core import predicted_confidence
from ood_core.evaluation import Evaluation
from ood_core.recorder import Recorder
from ood_core.scores import ASH, DICE, SCALE, ReAct, fDBD, make_score
from ood_core.scores.shaping import order_statistic, quantile_sketch

# tiny net: conv -> ReLU -> conv -> ReLU (6 x 4 x 4 map) -> avg pool -> flatten -> Linear(6, 3)
CONV1_RELU, CONV2, MAP, POOL, FLAT, HEAD = (1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7)


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    with torch.no_grad():  # spread the logits so that shaping visibly changes them
        net[0].weight.normal_(0.0, 1.0)
        net[2].weight.normal_(0.0, 0.5)
        net[6].weight.normal_(0.0, 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def net() -> nn.Sequential:
    return make_net()


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(120, 1, 6, 6, generator=g), 1.5 * torch.rand(50, 1, 6, 6, generator=g)


def parts(net: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4-D map after the second ReLU and the logits, computed by hand (float64)."""
    with torch.no_grad():
        m = net[3](net[2](net[1](net[0](x)))).double()
    return m, m.mean((2, 3))


def head(net: nn.Sequential, z: torch.Tensor) -> torch.Tensor:
    return z.double() @ net[6].weight.double().T + net[6].bias.double()


def layer_values(net: nn.Sequential, x: torch.Tensor, layer: tuple[int, int]) -> torch.Tensor:
    """What the score shapes for ``layer``: the map for MAP, the penultimate vector otherwise."""
    m, z = parts(net, x)
    return m if layer == MAP else z


def run(score, layer, net, x_calib, x_test):
    """Fit ``score`` on ``layer`` with the engine, return ``(logits, conformity)`` on ``x_test``."""
    score.layers = (layer,)
    eng = Evaluation.for_net(
        net, x_calib, input_range=(0, 1.5)
    )  # ``data``'s test set: 1.5 x [0, 1]
    eng.fit([score], x_calib)
    ((logits, conf),) = eng.confidences([score], x_test)
    return logits, conf


# ------------------------------------------------------------------------------------- helpers
def test_order_statistic_matches_torch_quantile() -> None:
    v = torch.randn(1001, generator=torch.Generator().manual_seed(2)).double()
    for q in (0.0, 0.1, 0.37, 0.5, 0.9, 0.999, 1.0):
        for interp in ("higher", "lower"):
            assert order_statistic(v, q, interp) == float(
                torch.quantile(v, q, interpolation=interp)
            )
    # q (n - 1) = 9.000000000000002 in floating point: still the 10th value, not the 11th
    assert order_statistic(torch.arange(11.0), 0.9, "higher") == 9.0


def test_quantile_sketch_is_exact_small_and_accurate_large() -> None:
    g = torch.Generator().manual_seed(3)
    small = torch.randn(7, 5, 10, 10, generator=g)  # 500 values per sample <= 512: kept as is
    assert torch.equal(quantile_sketch(small), small.flatten(1))
    big = torch.randn(300, 2000, generator=g).exp() * torch.rand(300, 1, generator=g)
    sketch = quantile_sketch(big)
    assert sketch.shape == (300, 512)
    for p in (0.1, 0.5, 0.9, 0.99):
        c = order_statistic(sketch, p, "higher")
        rank = float((big <= c).double().mean())
        assert abs(rank - p) < 0.003, (p, rank)


# ------------------------------------------------------------------------------------- ReAct
@pytest.mark.parametrize("layer", [HEAD, POOL, FLAT, MAP])
def test_react_percentile_100_is_softmax_on_calibration(net, data, layer) -> None:
    x, _ = data
    logits, conf = run(ReAct(percentile=100.0), layer, net, x, x)
    assert conf.shape == (len(x), 3) and conf.dtype == torch.float64
    torch.testing.assert_close(conf, torch.softmax(logits.double(), 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", [HEAD, POOL, MAP])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("output", ["softmax", "energy"])
def test_react_matches_manual_clipping(net, data, layer, symmetric, output) -> None:
    x, x_test = data
    score = ReAct(percentile=80.0, symmetric=symmetric, output=output)
    logits, conf = run(score, layer, net, x, x_test)
    calib = layer_values(net, x, layer).flatten()
    high = torch.quantile(calib, 0.8, interpolation="higher")
    low = torch.quantile(calib, 0.2, interpolation="lower") if symmetric else None
    a = layer_values(net, x_test, layer)
    assert (a > high).any()  # the clipping does something on the test data
    clipped = a.clamp(min=low, max=high)
    f = head(net, clipped.mean((2, 3)) if clipped.ndim == 4 else clipped)
    expected = (
        torch.softmax(f, 1) if output == "softmax" else torch.logsumexp(f, 1)[:, None].expand(-1, 3)
    )
    torch.testing.assert_close(conf, expected, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(f, logits.double(), atol=1e-3)  # the logits were indeed changed
    torch.testing.assert_close(
        logits.double(), head(net, parts(net, x_test)[1]), rtol=1e-5, atol=1e-5
    )


def test_react_refit_on_spatial_map_uses_new_thresholds(net, data) -> None:
    x, x_test = data
    score = ReAct(percentile=95.0)
    run(score, MAP, net, x, x_test)
    x2 = 0.5 * x  # smaller activations: lower threshold
    _, conf = run(score, MAP, net, x2, x_test)
    high = torch.quantile(parts(net, x2)[0].flatten(), 0.95, interpolation="higher")
    f = head(net, parts(net, x_test)[0].clamp(max=high).mean((2, 3)))
    torch.testing.assert_close(conf, torch.softmax(f, 1), rtol=1e-6, atol=1e-9)


def test_react_seed_style_matches_engine(net, data) -> None:
    x, x_test = data
    rnet = Recorder(net, input_data=x[:1], input_range=(0, 1.5))  # as ``run``
    rnet.record(MAP)
    score = ReAct(output="energy")
    score.fit(rnet, x)
    logits, conf = score(x_test)
    _, conf2 = run(ReAct(output="energy"), MAP, net, x, x_test)
    torch.testing.assert_close(conf, conf2)
    assert predicted_confidence(logits, conf).shape == (len(x_test),)
    assert make_score(**score.config()) == score


def test_react_act_norm_normalises_the_head_input(net, data) -> None:
    x, x_test = data
    _, conf = run(ReAct(percentile=70.0, act_norm=2.0), HEAD, net, x, x_test)
    z_calib, z = parts(net, x)[1], parts(net, x_test)[1]
    z_calib = z_calib / z_calib.norm(dim=1, keepdim=True)
    z = z / z.norm(dim=1, keepdim=True)
    high = torch.quantile(z_calib.flatten(), 0.7, interpolation="higher")
    torch.testing.assert_close(conf, torch.softmax(head(net, z.clamp(max=high)), 1))


def test_react_spatial_features_extracted_before_fit_are_refused(net, data) -> None:
    x, _ = data
    eng = Evaluation.for_net(net, x)
    score = ReAct()
    score.layers = score.check_layers((MAP,), eng.recorder)
    ex = eng.extract([score], x)
    assert set(ex.features[0]) == {"sketch"} and ex.features[0]["sketch"].shape == (len(x), 96)
    score.fit_features(ex.features[0], ex.logits, None)
    with pytest.raises(RuntimeError, match="extracted before the fit"):
        score.conformity_from_features(ex.features[0], ex.logits)


def test_react_param_validation() -> None:
    with pytest.raises(
        ValueError, match=r"ReAct: parameter 'percentile' must be > 50 when symmetric"
    ):
        ReAct(percentile=40.0, symmetric=True)
    with pytest.raises(ValueError, match=r"ReAct: parameter 'percentile' must be in \(0, 100\]"):
        ReAct(percentile=0.0)
    with pytest.raises(ValueError, match=r"'output' must be one of"):
        ReAct(output="logits")


# ------------------------------------------------------------------------------------- ASH / SCALE
def ref_ash(x: torch.Tensor, variant: str, percentile: float) -> torch.Tensor:
    """Straight transcription of the ASH reference code on a 4-D tensor."""
    x = x.clone()
    b, c, h, w = x.shape
    s1 = x.sum(dim=[1, 2, 3])
    n = x.shape[1:].numel()
    k = n - int(np.round(n * percentile / 100.0))
    t = x.view((b, c * h * w))
    v, i = torch.topk(t, k, dim=1)
    if variant == "b":
        t.zero_().scatter_(dim=1, index=i, src=(s1 / k).unsqueeze(1).expand(v.shape).contiguous())
        return x
    t.zero_().scatter_(dim=1, index=i, src=v)
    if variant == "s":
        s2 = x.sum(dim=[1, 2, 3])
        x = x * torch.exp(s1 / s2)[:, None, None, None]
    return x


def ref_scale(x: torch.Tensor, percentile: float) -> torch.Tensor:
    pruned = ref_ash(x, "p", percentile)
    return x * torch.exp(x.sum(dim=[1, 2, 3]) / pruned.sum(dim=[1, 2, 3]))[:, None, None, None]


def as_map(a: torch.Tensor) -> torch.Tensor:
    return a if a.ndim == 4 else a[:, :, None, None]


@pytest.mark.parametrize("layer", [HEAD, MAP])
def test_ash_p_percentile_0_is_energy(net, data, layer) -> None:
    x, x_test = data
    logits, conf = run(ASH(variant="p", percentile=0.0), layer, net, x, x_test)
    torch.testing.assert_close(
        conf[:, 0], torch.logsumexp(logits.double(), 1), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("layer", [HEAD, POOL, MAP])
@pytest.mark.parametrize("variant", ["p", "b", "s", "scale"])
def test_ash_and_scale_match_reference_code(net, data, layer, variant) -> None:
    x, x_test = data
    score = SCALE(percentile=65.0) if variant == "scale" else ASH(variant=variant, percentile=65.0)
    logits, conf = run(score, layer, net, x, x_test)
    a = as_map(layer_values(net, x_test, layer))
    shaped = ref_scale(a, 65.0) if variant == "scale" else ref_ash(a, variant, 65.0)
    f = head(net, shaped.mean((2, 3)))
    assert conf.shape == (len(x_test), 3)
    torch.testing.assert_close(conf[:, 1], torch.logsumexp(f, 1), rtol=1e-6, atol=1e-6)
    assert (conf[:, 0] - torch.logsumexp(logits.double(), 1)).abs().max() > 1e-2


def test_ash_scale_param_validation() -> None:
    with pytest.raises(ValueError, match=r"ASH: parameter 'percentile' must be in \[0, 100\)"):
        ASH(percentile=100.0)
    with pytest.raises(ValueError, match=r"ASH: parameter 'variant' must be one of"):
        ASH(variant="x")
    with pytest.raises(ValueError, match=r"SCALE: parameter 'percentile'"):
        SCALE(percentile=-1.0)


# ------------------------------------------------------------------------------------- DICE
@pytest.mark.parametrize("layer", [HEAD, MAP])
def test_dice_sparsity_0_is_energy(net, data, layer) -> None:
    x, x_test = data
    logits, conf = run(DICE(sparsity=0.0), layer, net, x, x_test)
    torch.testing.assert_close(
        conf[:, 2], torch.logsumexp(logits.double(), 1), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("layer", [HEAD, MAP])
def test_dice_matches_numpy(net, data, layer) -> None:
    x, x_test = data
    _, conf = run(DICE(sparsity=0.6), layer, net, x, x_test)
    w = net[6].weight.detach().double().numpy()
    b = net[6].bias.detach().double().numpy()
    mean = parts(net, x)[1].numpy().mean(0)
    contrib = (w * mean[None, :]).ravel()
    keep = np.zeros(contrib.size, dtype=bool)
    keep[np.argsort(-contrib)[: contrib.size - round(0.6 * contrib.size)]] = True
    w_sparse = w * keep.reshape(w.shape)
    z = parts(net, x_test)[1].numpy()
    expected = logsumexp(z @ w_sparse.T + b, axis=1)
    np.testing.assert_allclose(conf[:, 0].numpy(), expected, rtol=1e-6, atol=1e-8)
    assert keep.sum() == 7


# ------------------------------------------------------------------------------------- fDBD
@pytest.mark.parametrize("layer", [HEAD, MAP])
def test_fdbd_matches_direct_computation(net, data, layer) -> None:
    x, x_test = data
    logits, conf = run(fDBD(), layer, net, x, x_test)
    w = net[6].weight.detach().double().numpy()
    mean = parts(net, x)[1].numpy().mean(0)
    z = parts(net, x_test)[1].numpy()
    f = logits.double().numpy()
    expected = []
    for i in range(len(z)):
        c = int(f[i].argmax())
        d = [abs(f[i, c] - f[i, k]) / np.linalg.norm(w[c] - w[k]) for k in range(3) if k != c]
        expected.append(np.mean(d) / np.linalg.norm(z[i] - mean))
    np.testing.assert_allclose(conf[:, 0].numpy(), expected, rtol=1e-5)
    assert conf.shape == (len(x_test), 3) and (conf > 0).all()


# ------------------------------------------------------------------------------------- layers
def test_incompatible_layer_is_refused_with_a_clear_message(net, data) -> None:
    x, _ = data
    eng = Evaluation.for_net(net, x)
    score = ReAct()
    score.layers = (CONV1_RELU,)
    with pytest.raises(
        ValueError,
        match=r"ReAct: layer 1-2 \(1, ReLU, output \(4, 4, 4\)\) "
        r"cannot feed the final Linear head 1-7 .*in_features=6",
    ):
        eng.fit([score], x)
    # right size, but a ReLU follows it: the head does not reproduce the logits from it
    score = ASH()
    score.layers = (CONV2,)
    with pytest.raises(ValueError, match=r"layer 1-3 does not reproduce the network's logits"):
        eng.fit([score], x)
    score = DICE()
    score.layers = (MAP, HEAD)
    with pytest.raises(ValueError, match=r"DICE takes at most 1 layer"):
        eng.fit([score], x)


def test_network_without_linear_head_is_refused(data) -> None:
    x, _ = data
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    score = fDBD()
    score.layers = ((1, 1),)
    with pytest.raises(ValueError, match=r"fDBD recomputes the logits .* has no nn.Linear layer"):
        Evaluation.for_net(net, x).fit([score], x)


# ------------------------------------------------------------------------------------- real model
WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "hub" / "weights" / "tiniest.pt"


@pytest.mark.slow
@pytest.mark.skipif(not WEIGHTS.exists(), reason="bundled tiniest weights not trained yet")
def test_shaping_scores_on_tiniest(tiniest, fmnist_calib, fmnist_test, mnist) -> None:
    from ood_core.metrics import AUC

    calib = fmnist_calib.subset(500, seed=0)
    ind, ood = fmnist_test.subset(500, seed=0).images, mnist.subset(500, seed=0).images
    scores = [ReAct(), ReAct(output="energy"), ASH(), SCALE(), DICE(), fDBD()]
    layers = [(1, 11), (1, 10), (1, 12), (1, 12), (1, 12), (1, 12)]
    for s, layer in zip(scores, layers, strict=True):
        s.layers = (layer,)
    eng = Evaluation.for_net(tiniest, calib.images)
    eng.fit(scores, calib.images, calib.labels)
    res_ind = eng.confidences(scores, ind)
    res_ood = eng.confidences(scores, ood)
    for s, (li, ci), (lo, co) in zip(scores, res_ind, res_ood, strict=True):
        auc = AUC()(predicted_confidence(li, ci), predicted_confidence(lo, co))
        assert auc > 0.6, (s, auc)
