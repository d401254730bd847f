"""Bad inputs on the library path (seed API and score objects), table-driven: each row gives a
clear error naming the problem, expected vs got, and what to do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ood_core import scores
from ood_core.eval import compute_confidence, fit_scores
from ood_core.inputs import check_inputs, declared_range


@pytest.fixture(scope="module")
def setup(tiniest, fmnist_calib):
    x = fmnist_calib.images[:64]
    y = fmnist_calib.labels[:64]
    fitted = fit_scores(
        [(scores.Softmax(), []), (scores.KNN(k=5), [(1, 11)])], tiniest, x, y, progress=False
    )
    return tiniest, x, y, fitted


GOOD = torch.rand(8, 1, 28, 28)

BAD_BATCHES = [
    ("uint8 images", (GOOD * 255).to(torch.uint8), r"dtype torch.uint8.*x.float\(\) / 255"),
    ("int64 images", (GOOD * 255).long(), r"must be float images; got dtype torch.int64"),
    (
        "0-255 floats",
        GOOD * 255,
        r"values in \[.*\] but the model expects inputs in \[0, 1\] \(0-255",
    ),
    ("negative values", GOOD - 0.5, r"expects inputs in \[0, 1\]"),
    ("normalised twice", (GOOD - 0.2860) / 0.3530, r"do not normalise them yourself"),
    (
        "32x32 images",
        torch.rand(8, 1, 32, 32),
        r"shape \(1, 32, 32\) but the model declares \(1, 28, 28\)",
    ),
    (
        "3 channels",
        torch.rand(8, 3, 28, 28),
        r"shape \(3, 28, 28\) but the model declares \(1, 28, 28\)",
    ),
    ("missing channel dim", torch.rand(8, 28, 28), r"shape \(28, 28\) but the model declares"),
    ("NaN values", torch.where(GOOD > 0.99, torch.nan, GOOD), r"contain NaN values"),
    ("empty batch", torch.rand(0, 1, 28, 28), r"empty inputs \(0 samples\)"),
    ("numpy array", GOOD.numpy(), r"must be a torch.Tensor.*torch.as_tensor"),
    ("a single image without batch dim", torch.rand(28), r"leading sample dimension"),
]


@pytest.mark.parametrize(("what", "batch", "message"), BAD_BATCHES, ids=[r[0] for r in BAD_BATCHES])
def test_bad_batches_are_refused_by_the_seed_api(setup, what, batch, message):
    net, _, _, fitted = setup
    with pytest.raises(ValueError, match=message):
        compute_confidence(fitted, batch, progress=False)


@pytest.mark.parametrize(
    ("what", "batch", "message"), BAD_BATCHES[:8], ids=[r[0] for r in BAD_BATCHES[:8]]
)
def test_bad_batches_are_refused_by_a_score_call_and_by_fit(setup, what, batch, message):
    net, x, y, fitted = setup
    score = fitted[0][0]
    with pytest.raises(ValueError, match=message):
        score(batch)
    with pytest.raises(ValueError, match=message):
        fit_scores([(scores.Energy(), [])], net, batch, progress=False)


def _fit(net, x, y, score, layers):
    return fit_scores([(score, layers)], net, x, y, progress=False)


BAD_CALLS = [
    (
        "unknown layer id",
        lambda n, x, y: _fit(n, x, y, scores.KNN(k=3), [(1, 99)]),
        r"Unknown layer id 1-99",
    ),
    ("layer id as garbage", lambda n, x, y: _fit(n, x, y, scores.KNN(k=3), ["abc"]), r"abc"),
    (
        "no layer for a layer score",
        lambda n, x, y: _fit(n, x, y, scores.KNN(k=3), []),
        r"KNN reads internal activations",
    ),
    (
        "k above calibration size",
        lambda n, x, y: _fit(n, x, y, scores.KNN(k=500), [(1, 11)]),
        r"KNN.*k",
    ),
    (
        "labels of the wrong length",
        lambda n, x, y: _fit(n, x, y[:10], scores.Softmax(), []),
        r"calib_labels must have shape \(64,\)",
    ),
    (
        "labels of the wrong rank",
        lambda n, x, y: _fit(n, x, y[:, None], scores.Softmax(), []),
        r"calib_labels must have shape",
    ),
    (
        "not a (score, layers) pair",
        lambda n, x, y: fit_scores([scores.Softmax()], n, x, y, progress=False),
        r"\(score, layers\) pairs",
    ),
    ("no score at all", lambda n, x, y: fit_scores([], n, x, y, progress=False), r"at least one"),
    ("unknown score parameter", lambda n, x, y: scores.KNN(k=3, kk=4), r"KNN: unknown parameter"),
    (
        "string where an int is expected",
        lambda n, x, y: scores.KNN(k="3"),
        r"KNN: parameter 'k' must be an int",
    ),
    (
        "negative temperature",
        lambda n, x, y: scores.Energy(temperature=-1.0),
        r"Energy: parameter 'temperature' must be in",
    ),
    (
        "unknown mode",
        lambda n, x, y: scores.Softmax(mode="best"),
        r"Softmax: parameter 'mode' must be one of",
    ),
    (
        "act_norm zero",
        lambda n, x, y: scores.Softmax(act_norm=0.0),
        r"Softmax: parameter 'act_norm'",
    ),
    (
        "OoD titles of the wrong length",
        lambda n, x, y: compute_confidence(
            _fit(n, x, y, scores.Softmax(), []), x, [x], ["a", "b"], progress=False
        ),
        r"1 OoD sets but 2 titles",
    ),
    ("score used before fit", lambda n, x, y: scores.Softmax()(x), r"fit"),
]


@pytest.mark.parametrize(("what", "call", "message"), BAD_CALLS, ids=[r[0] for r in BAD_CALLS])
def test_bad_calls_give_clear_errors(setup, what, call, message):
    net, x, y, _ = setup
    with pytest.raises((ValueError, RuntimeError), match=message):
        call(net, x, y)


def test_good_batches_pass_and_ranges_are_read_from_the_declaration(tiniest):
    check_inputs(tiniest, GOOD)
    check_inputs(tiniest, torch.zeros(2, 1, 28, 28))
    check_inputs(tiniest, torch.ones(2, 1, 28, 28).double())
    assert declared_range(tiniest) == (0.0, 1.0)
    net = torch.nn.Linear(4, 2)
    assert declared_range(net) is None
    wide = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)) * 1000
    with pytest.raises(ValueError, match=r"declares no input range, so inputs in \[0, 1\] are"):
        check_inputs(net, wide, traced_shape=(4,))  # nothing declared: [0, 1] assumed
    check_inputs(net, wide, traced_shape=(4,), input_range="any")  # the check switched off
    check_inputs(net, wide, traced_shape=(4,), input_range=(-3000, 3000))
    net.ood_lens = {"input_range": (-1, 1)}
    with pytest.raises(ValueError, match=r"expects inputs in \[-1, 1\]"):
        check_inputs(net, torch.full((3, 4), 2.0), traced_shape=(4,))
    assert np.isclose(declared_range(net)[0], -1.0)


# ---------------------------------------------------------------------------- odd inputs
def _with(value, *index):
    x = GOOD.clone()
    x[index] = value
    return x


ODD_BATCHES = [
    ("meta-device tensor", torch.empty(8, 1, 28, 28, device="meta"), r"on the 'meta' device"),
    (
        "complex images",
        torch.complex(GOOD, torch.zeros_like(GOOD)),
        r"real float images; got complex dtype torch.complex64\. Pass x.real",
    ),
    ("sparse tensor", GOOD.to_sparse(), r"dense tensor; got layout torch.sparse_coo.*to_dense"),
    (
        "an infinite pixel",
        _with(torch.inf, 3, 0, 4, 5),
        r"infinite values \(1, the first at sample 3, position \(0, 4, 5\)\)",
    ),
    (
        "a NaN pixel, located",
        _with(torch.nan, 1, 0, 2, 3),
        r"NaN values \(1, the first at sample 1",
    ),
    (
        "pixel 1.0015, all its digits",
        _with(1.0015, 2, 0, 5, 6),
        r"values in \[[\d.e-]+, 1\.0015\] but the model expects inputs in \[0, 1\]\. .* 1 "
        r"value\(s\) lie outside \[0, 1\] by more than the tolerance 0\.001; the farthest is "
        r"1\.0015 at sample 2, position \(0, 5, 6\)",
    ),
    (
        "pixel -0.0025",
        _with(-0.0025, 0, 0, 0, 1),
        r"values in \[-0\.0025, .*the farthest is -0\.0025 at sample 0, position \(0, 0, 1\)",
    ),
]


@pytest.mark.parametrize(("what", "batch", "message"), ODD_BATCHES, ids=[r[0] for r in ODD_BATCHES])
def test_odd_batches_are_refused_by_the_seed_api_and_by_fit(setup, what, batch, message):
    net, _, _, fitted = setup
    with pytest.raises(ValueError, match=message):
        compute_confidence(fitted, batch, progress=False)
    if batch.layout != torch.strided:
        return  # fit_scores slices calib_data[:1] first, which sparse COO tensors do not support
    with pytest.raises(ValueError, match=message):
        fit_scores([(scores.Energy(), [])], net, batch, progress=False)


def test_values_within_the_rounding_tolerance_pass(tiniest):
    check_inputs(tiniest, _with(1.0005, 0, 0, 0, 0))  # RANGE_TOLERANCE = 1e-3: stored rounding
    check_inputs(tiniest, _with(-0.0005, 0, 0, 0, 0))


def _labels(y, index, value, dtype=None):
    y = y.clone().to(dtype or y.dtype)
    y[index] = value
    return y


BAD_LABELS = [  # (score, layers, labels from the good ones, message)
    (
        lambda: scores.Gram(calib_labels="true"),
        [(1, 1)],
        lambda y: _labels(y, 0, -1),
        r"Gram\(calib_labels='true'\): calibration labels must lie in \[0, 2\] \(3 classes\); "
        r"got \[-1, 2\], e.g. -1 at index 0 \(1 such label\(s\)\)",
    ),
    (
        lambda: scores.Gram(calib_labels="true"),
        [(1, 1)],
        lambda y: _labels(y, 5, 3),
        r"Gram.*must lie in \[0, 2\].*e.g. 3 at index 5",
    ),
    (
        lambda: scores.DeepMahalanobis(),
        [(1, 3)],
        lambda y: _labels(y, 7, 1.5, torch.float32),
        r"DeepMahalanobis\(\): calibration labels must be integer class indices; label 7 is 1.5 "
        r"\(not a whole number; 1 such label\(s\)\)",
    ),
    (
        lambda: scores.MultiMahalanobis(),
        [(1, 3)],
        lambda y: _labels(y, 0, torch.nan, torch.float64),
        r"MultiMahalanobis\(\): .*label 0 is nan \(not finite",
    ),
    (
        lambda: scores.RelativeMahalanobis(),
        [(1, 3)],
        lambda y: _labels(y, 4, torch.inf, torch.float32),
        r"RelativeMahalanobis\(\): .*label 4 is inf \(not finite",
    ),
    (
        lambda: scores.TemperatureScaling(),
        [],
        lambda y: _labels(y, 2, -1),
        r"TemperatureScaling\(\): calibration labels must lie in \[0, 2\]",
    ),
    (
        lambda: scores.IsoMax(n_steps=1),
        [],
        lambda y: _labels(y, 1, 1000),
        r"IsoMax\(n_steps=1\): calibration labels must lie in \[0, 2\].*e.g. 1000 at index 1",
    ),
    (
        lambda: scores.Odds(epsilon=0.1, noise_samples=2),
        [],
        lambda y: _labels(y, 3, 2.5, torch.float64),
        r"Odds\(.*\): calibration labels must be integer class indices; label 3 is 2.5",
    ),
    (
        lambda: scores.DkNN(k=3),
        [(1, 5)],
        lambda y: _labels(y, 0, -1),
        r"DkNN\(k=3\): calibration labels must lie in \[0, 2\]",
    ),
    (
        lambda: scores.Trust(alpha=0.0),
        [(1, 5)],
        lambda y: _labels(y, 9, torch.nan, torch.float32),
        r"Trust\(alpha=0\): .*label 9 is nan",
    ),
    (
        lambda: scores.JTLA(test={"type": "multinomial", "mode": "mle", "k": 3}),
        [(1, 5)],
        lambda y: _labels(y, 0, 3),
        r"JTLA\(.*\): calibration labels must lie in \[0, 2\]",
    ),
    (
        lambda: scores.Gram(calib_labels="true"),
        [(1, 1)],
        lambda y: y.bool(),
        r"must be integer class indices; got dtype torch.bool",
    ),
]


@pytest.mark.parametrize(
    ("make", "layers", "labels", "message"),
    BAD_LABELS,
    ids=[f"{i}-{m.split(':')[0]}" for i, (_, _, _, m) in enumerate(BAD_LABELS)],
)
def test_bad_labels_are_refused_by_the_score_label_check(net, data, make, layers, labels, message):
    x, y = data
    with pytest.raises(ValueError, match=message):
        fit_scores([(make(), layers)], net, x, labels(y), progress=False)


def test_good_labels_pass_as_int_or_whole_floats_and_jtla_hint(net, data):
    x, y = data
    for lab in (y, y.double(), y.int()):
        fit_scores([(scores.DeepMahalanobis(), [(1, 3)])], net, x, lab, progress=False)
    jtla = scores.JTLA(test={"type": "multinomial", "mode": "mle", "k": 3}, n_classes_hint=5)
    fit_scores([(jtla, [(1, 5)])], net, x, _labels(y, 0, 4), progress=False)  # 4 < hint


def test_gradnorm_scores_frozen_layers_without_changing_the_model(net, data):
    """All parameters frozen (requires_grad=False): GradNorm computes the same conformity (the
    per-sample gradients are taken w.r.t. detached copies) and leaves the flags as they were."""
    from conftest import fit_one

    from ood_core.evaluation import Evaluation

    x, y = data
    layers = ((1, 1), (1, 5))  # conv (torch.func per-sample gradients), fc (closed form)
    ref = {lid: fit_one(net, scores.GradNorm(), [lid], x, y, x)[1] for lid in layers}
    for p in net.parameters():
        p.requires_grad_(False)
    for lid in layers:
        conf = fit_one(net, scores.GradNorm(), [lid], x, y, x)[1]
        assert torch.equal(conf, ref[lid]), lid
    assert not any(p.requires_grad for p in net.parameters())
    rec = Evaluation.for_net(net, x).recorder
    assert set(layers) <= set(scores.GradNorm.allowed_layers(rec))
    with pytest.raises(ValueError, match=r"GradNorm needs layers holding parameters; 1-2 \(relu\)"):
        fit_one(net, scores.GradNorm(), [(1, 2)], x, y, x)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (10**11, r"calib_labels: calibration labels must lie in \[0, 2\].*e\.g\. 100000000000"),
        (-5, r"calib_labels: calibration labels must lie in \[0, 2\]"),
        (1.5, r"calib_labels: .*not a whole number"),
    ],
)
def test_labels_of_a_joint_fit_are_checked_before_any_work(net, data, value, message):
    """Several scores at once, one of which ignores labels: the evaluation itself refuses
    labels that are no class of the network, before counting them (1e11 would ask ~800 GB)."""
    x, y = data
    bad = y.double().clone()
    bad[1] = value
    pairs = [(scores.Softmax(), []), (scores.Gram(), [(1, 1)])]
    with pytest.raises(ValueError, match=message):
        fit_scores(pairs, net, x, bad, progress=False)
