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
    check_inputs(
        net, torch.randn(3, 4) * 1000, traced_shape=(4,)
    )  # nothing declared: no range check
    net.ood_lens = {"input_range": (-1, 1)}
    with pytest.raises(ValueError, match=r"expects inputs in \[-1, 1\]"):
        check_inputs(net, torch.full((3, 4), 2.0), traced_shape=(4,))
    assert np.isclose(declared_range(net)[0], -1.0)
