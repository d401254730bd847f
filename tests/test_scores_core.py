"""Core scores (logit family, KNN, Gram, GradNorm), score interface and the single-pass engine."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyConv
from conftest import fit_one as run

from ood_core.core import predicted_confidence
from ood_core.evaluation import Evaluation
from ood_core.recorder import Recorder
from ood_core.scores import (
    GEN,
    KNN,
    ODIN,
    SCORES,
    Energy,
    Entropy,
    GradNorm,
    Gram,
    JointEnergy,
    KLMatching,
    Logit,
    Softmax,
    TemperatureScaling,
    get_score_class,
    list_scores,
    make_score,
    postprocess_conformity,
)
from ood_core.scores.gram import deviation, gram_stats


# ---------------------------------------------------------------- logit family, closed forms
def test_logit_family_closed_forms(net, data):
    x, y = data
    z = net(x).double().detach()
    cases = {
        Softmax(): torch.softmax(z, 1),
        Logit(): z,
        Energy(): torch.logsumexp(z, 1, keepdim=True).expand(-1, 3),
        Energy(temperature=2.0): (2 * torch.logsumexp(z / 2, 1, keepdim=True)).expand(-1, 3),
        JointEnergy(): F.softplus(z).sum(1, keepdim=True).expand(-1, 3),
        Entropy(): (torch.softmax(z, 1) * torch.log_softmax(z, 1))
        .sum(1, keepdim=True)
        .expand(-1, 3),
        GEN(gamma=0.5, top_m=2): -(
            torch.softmax(z, 1).topk(2, 1).values.pow(0.5)
            * (1 - torch.softmax(z, 1).topk(2, 1).values).pow(0.5)
        )
        .sum(1, keepdim=True)
        .expand(-1, 3),
    }
    for score, expected in cases.items():
        logits, conf = run(net, score, [], x, y, x)
        assert conf.dtype == torch.float64 and conf.shape == (60, 3)
        torch.testing.assert_close(conf, expected, msg=repr(score))


def test_softmax_invariant_to_constant_shift_of_logits():
    z = torch.randn(20, 5, dtype=torch.float64)
    s = Softmax()
    a = s.conformity_from_features({}, z)
    b = s.conformity_from_features({}, z + 123.0)
    torch.testing.assert_close(a, b)


def test_float64_logits_avoid_saturation_ties():
    # float32 softmax saturates to exactly 1.0 for both rows; float64 keeps them apart.
    z = torch.tensor([[40.0, 0.0], [45.0, 0.0]])
    assert torch.softmax(z, 1)[0, 0] == torch.softmax(z, 1)[1, 0] == 1.0
    conf = Energy().conformity_from_features({}, z)
    assert conf[1, 0] > conf[0, 0]


def test_modes_diff_and_ratio():
    c = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=torch.float64)
    torch.testing.assert_close(
        postprocess_conformity(c, "diff"),
        torch.tensor([[0.2, -0.2, -0.3], [-0.7, -0.7, 0.7]], dtype=torch.float64),
    )
    torch.testing.assert_close(
        postprocess_conformity(c, "ratio"),
        torch.tensor([[0.5 / 0.3, 0.6, 0.4], [0.125, 0.125, 8.0]], dtype=torch.float64),
    )


def test_temperature_scaling_fits_nll_optimum(net, data):
    x, y = data
    s = TemperatureScaling()
    run(net, s, [], x, y, x)
    z = net(x).detach().double()
    nll = lambda t: F.cross_entropy(z / t, y).item()  # noqa: E731
    t = s.fitted_temperature
    assert nll(t) <= nll(t * 1.05) + 1e-9 and nll(t) <= nll(t / 1.05) + 1e-9


def test_kl_matching_is_zero_at_template():
    s = KLMatching()
    z = torch.tensor([[3.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    s.fit_features({}, z, None)
    # the only class-1 sample is its own template: KL = 0 at its predicted class
    conf = s.conformity_from_features({}, z[2:3])
    assert conf[0, 1].item() == pytest.approx(0.0, abs=1e-9)
    assert conf[0, 0] < 0


def test_odin_without_epsilon_is_tempered_softmax_and_with_epsilon_runs_own_pass(net, data):
    x, y = data
    z = net(x).double().detach()
    _, conf = run(net, ODIN(temperature=10.0), [], x, y, x)
    torch.testing.assert_close(conf, torch.softmax(z / 10, 1))
    odin = ODIN(temperature=10.0, epsilon=0.01)
    assert odin.needs_input_grad and odin.needs_own_pass
    _, conf_eps = run(net, odin, [], x, y, x)
    assert not torch.allclose(conf_eps, conf)
    # the step increases the max tempered log-softmax of most samples
    top = predicted_confidence(z, conf)
    top_eps = predicted_confidence(z, conf_eps)
    assert (top_eps >= top - 1e-12).float().mean() > 0.9


# ---------------------------------------------------------------- KNN
def test_knn_equals_brute_force(net, data):
    x, y = data
    k = 4
    logits, conf = run(net, KNN(k=k), [(1, 3)], x[:40], y[:40], x[40:])
    feats = lambda t: F.normalize(net.pool(net.relu(net.conv(t))).flatten(1), dim=1)  # noqa: E731
    with torch.no_grad():
        d2 = torch.cdist(feats(x[40:]), feats(x[:40])).pow(2)
    expected = -d2.sort(1).values[:, k - 1]
    torch.testing.assert_close(conf[:, 0], expected.double(), atol=1e-5, rtol=1e-4)
    assert torch.equal(conf[:, 0], conf[:, 2])  # per-sample score repeated over classes


def test_knn_rejects_k_larger_than_calibration(net, data):
    x, y = data
    with pytest.raises(ValueError, match=r"k=50 neighbours but only 10 calibration samples"):
        run(net, KNN(k=50), [(1, 3)], x[:10], y[:10], x)


def test_parameters_are_validated_with_clear_messages():
    with pytest.raises(ValueError, match=r"missing required parameter\(s\) \['k'\]"):
        KNN()
    with pytest.raises(ValueError, match=r"KNN: parameter 'k' must be in >= 1, got 0"):
        KNN(k=0)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['kk'\]"):
        KNN(k=3, kk=2)
    with pytest.raises(ValueError, match="one of"):
        KNN(k=3, index_metric="cosine")
    with pytest.raises(ValueError, match="reads internal activations"):
        KNN(k=3).check_layers([])


def test_repr_and_config_round_trip():
    s = KNN(k=15)
    assert repr(s) == "KNN(k=15)" and repr(Softmax()) == "Softmax()"
    assert s.full_repr() == (
        "KNN(act_norm=2, index='exact', index_metric='l2', k=15, mode='raw', nprobe=16, "
        "pooling='flatten')"
    )
    cfg = Gram(max_gram_order=3, cut_off=0.05).config()
    assert make_score(**cfg) == Gram(max_gram_order=3, cut_off=0.05)


def test_changing_a_parameter_unfits_but_mode_does_not():
    s = Softmax()
    s.fitted = True
    s.mode = "diff"
    assert s.fitted
    k = KNN(k=3)
    k.fitted = True
    k.k = 4
    assert not k.fitted


# ---------------------------------------------------------------- Gram
def direct_gram_rows(a: torch.Tensor, p: int) -> torch.Tensor:
    """Straightforward loops over samples / rows / columns."""
    n, ch = a.shape[:2]
    f = a.double().reshape(n, ch, -1)
    out = torch.zeros(n, ch, dtype=torch.float64)
    for s in range(n):
        fp = f[s] ** p
        for i in range(ch):
            for j in range(i, ch):
                out[s, i] += abs(float(fp[i] @ fp[j])) ** (1 / p)
    return out


def test_gram_stats_equal_direct_implementation_on_2x3x4():
    a = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) / 10 - 1
    stats = gram_stats(a, max_order=3)
    assert stats.shape == (2, 3, 3)
    for p in (1, 2, 3):
        torch.testing.assert_close(stats[:, p - 1], direct_gram_rows(a, p))
    sep = gram_stats(a, max_order=2, separate_diagonal=True)
    assert sep.shape == (2, 2, 6)
    g1 = a.double() @ a.double().transpose(1, 2)
    torch.testing.assert_close(sep[:, 0, :3], g1.diagonal(dim1=1, dim2=2).abs())


def test_gram_deviation_is_relative_outside_the_band():
    low, high = torch.tensor([2.0]), torch.tensor([4.0])
    v = torch.tensor([1.0, 3.0, 6.0])
    torch.testing.assert_close(deviation(v, low, high), torch.tensor([0.5, 0.0, 0.5]))


def test_gram_scores_inside_band_as_most_conforming(net, data):
    x, y = data
    test = torch.cat([x, x * 8])  # amplified inputs, beyond [0, 1]
    logits, conf = run(
        net, Gram(max_gram_order=2), [(1, 1), (1, 5)], x, y, test, input_range=(0, 8)
    )
    c = predicted_confidence(logits, conf)
    assert c.shape == (120,) and c.max() <= 0
    assert c[:60].mean() > c[60:].mean()  # amplified inputs deviate more


# ---------------------------------------------------------------- GradNorm
def naive_gradnorm(net, x, p, t=1.0):
    out = []
    for i in range(len(x)):
        net.zero_grad()
        loss = -torch.log_softmax(net(x[i : i + 1]) / t, dim=1).mean()
        loss.backward()
        g = torch.cat([net.fc.weight.grad.flatten(), net.fc.bias.grad.flatten()])
        out.append(g.norm(p=p).item())
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_gradnorm_closed_form_and_vmap_equal_a_naive_loop(net, data, p):
    x, y = data
    expected = naive_gradnorm(net, x[:10], p, t=2.0)
    closed = GradNorm(grad_norm=p, temperature=2.0)
    _, conf = run(net, closed, [(1, 5)], x, y, x[:10])
    assert closed.closed_form and not closed.needs_own_pass
    torch.testing.assert_close(conf[:, 0], expected, rtol=1e-5, atol=1e-7)
    general = GradNorm(grad_norm=p, temperature=2.0)
    general.layers = ((1, 5),)
    eng = Evaluation.for_net(net, x)
    general.check_layers(general.layers, eng.recorder)
    general.__dict__["closed_form"] = False
    general.__dict__["needs_param_grad"] = True  # force the torch.func path
    ex = eng.extract([general], x[:10])
    torch.testing.assert_close(ex.features[0]["grad_norm"], expected, rtol=1e-5, atol=1e-7)


def test_gradnorm_on_a_conv_layer_uses_vmap_and_rejects_parameterless_layers(net, data):
    x, y = data
    s = GradNorm()
    _, conf = run(net, s, [(1, 1)], x, y, x[:5])
    assert s.needs_own_pass and torch.isfinite(conf).all()
    with pytest.raises(ValueError, match=r"needs layers holding parameters; 1-2"):
        run(net, GradNorm(), [(1, 2)], x, y, x)


# ---------------------------------------------------------------- engine
def test_seed_style_fit_and_call(net, data):
    x, y = data
    rnet = Recorder(net, input_data=x[:1])
    rnet.record((1, 3))
    s = KNN(k=3).fit(rnet, x, y)
    logits, conf = s(x[:7])
    assert logits.shape == (7, 3) and conf.shape == (7, 3)
    assert rnet.recording == ((1, 3),)  # the user's recording is restored
    assert [op for op, _, _ in s.timer.entries] == ["calibration", "inference"]
    fresh = KNN(k=3)
    with pytest.raises(RuntimeError, match="not fitted"):
        fresh(x)


def test_registry_describes_every_score():
    rows = {r["name"]: r for r in list_scores()}
    assert {"Softmax", "GradNorm", "Gram", "KNN", "Energy", "ODIN"} <= set(rows)
    assert rows["GradNorm"]["gradients"] == "parameters"
    assert rows["Softmax"]["needs_fit"] is False and rows["KNN"]["layers"] == "any"
    k = {p["name"]: p for p in rows["KNN"]["params"]}["k"]
    assert k["type"] == "int" and k["required"] and k["low"] == 1
    assert get_score_class("BaselineClassif") is Softmax
    for name, cls in SCORES.items():
        assert cls.reference, f"{name} must cite its paper"
        assert cls.__doc__ and "conformity" in cls.__doc__.lower(), name


def test_gram_rank_one_closed_form_and_float64_fallback():
    a = torch.randn(3, 5, 1, 1)
    stats = gram_stats(a, max_order=4)
    for p in (1, 4):
        torch.testing.assert_close(stats[:, p - 1], direct_gram_rows(a, p))
    big = torch.randn(2, 3, 4) * 20  # |a| > 8: products in float64, still exact
    torch.testing.assert_close(gram_stats(big, 8)[:, 7], direct_gram_rows(big, 8))


# ---------------------------------------------------------------- RankFeat
def test_rankfeat_equals_manual_rank1_removal_and_forward(net, data):
    import numpy as np

    from ood_core.scores import RankFeat

    x, y = data
    _, conf = run(net, RankFeat(), [(1, 1)], x, y, x[:8])
    with torch.no_grad():
        a = net.conv(x[:8]).double()
    expected = []
    for i in range(8):
        m = a[i].reshape(4, -1).numpy()
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        rest = torch.from_numpy(m - s[0] * np.outer(u[:, 0], vt[0])).reshape(1, 4, 6, 6)
        with torch.no_grad():
            f = net.fc(net.flat(net.pool(net.relu(rest.float())))).double()
        expected.append(torch.logsumexp(f, 1).item())
    torch.testing.assert_close(
        conf[:, 0], torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )


def test_rankfeat_of_a_rank_one_map_leaves_only_the_bias(net):
    from ood_core.scores.rankfeat import remove_rank1

    u, v = torch.randn(2, 4, 1), torch.randn(2, 1, 9)
    a = (u @ v).reshape(2, 4, 3, 3)
    assert remove_rank1(a).abs().max() < 1e-5
    from ood_core.scores import RankFeat

    with pytest.raises(ValueError, match=r"RankFeat needs a feature map .* layer 1-5"):
        RankFeat().check_layers([(1, 5)], Evaluation.for_net(net, torch.rand(2, 1, 6, 6)).recorder)


def test_float64_networks_work_and_agree_with_float32(data):
    import copy

    x, y = data
    torch.manual_seed(0)
    net32 = TinyConv().eval()
    net64 = copy.deepcopy(net32).double()

    def make():
        return [Softmax(), Energy(), KNN(k=3), Gram(max_gram_order=2), GradNorm()]

    layers = [[], [], [(1, 3)], [(1, 1)], [(1, 5)]]
    for s32, s64, lay in zip(make(), make(), layers, strict=True):
        _, c32 = run(net32, s32, lay, x, y, x)
        logits64, c64 = run(net64, s64, lay, x, y, x)
        assert logits64.dtype == torch.float64 and c64.dtype == torch.float64
        torch.testing.assert_close(c64, c32, rtol=1e-4, atol=1e-5, msg=repr(s64))


def test_kl_matching_closest_readout_is_the_papers_min_over_templates(net, data):
    x, y = data
    logits, conf = run(net, KLMatching(), [], x, y, x)
    _, closest = run(net, KLMatching(readout="closest"), [], x, y, x)
    torch.testing.assert_close(predicted_confidence(logits, closest), conf.amax(1))
    assert (predicted_confidence(logits, closest) >= predicted_confidence(logits, conf)).all()


def test_kl_matching_warns_about_a_class_never_predicted(net, data):
    from ood_core.diagnostics import OodLensWarning

    x, y = data
    with torch.no_grad():
        counts = torch.bincount(net(x).argmax(1), minlength=3)
    missing = [k for k in range(3) if counts[k] == 0]
    assert missing  # this untrained net predicts some classes never
    with pytest.warns(
        OodLensWarning, match=rf"KLMatching: class\(es\) {re.escape(str(missing))} are never"
    ):
        run(net, KLMatching(), [], x, y, x)
