"""Models shared and misused: nothing stored on the user's model, concurrent passes on one model
equal serial ones, a network editing its input or a recorded output in place changes neither the
caller's tensors nor the numbers, and an interrupted run or fit leaves nothing half-done.

Rows, by class (issue 15; the in-place rows also serve issue 16):

* ``STATE_ROWS`` - ways of running a model; after each, the model's ``__dict__`` keys, hooks
  and training flag are as before.
* ``CONCURRENT_ROWS`` - threads running the same work on one shared model object, each result
  equal to the serial one.
* ``MUTATING_ROWS`` - networks that write in place into their input or into a recorded layer's
  output; the caller's tensors keep their bytes and the confidences equal those of the same
  network without the in-place write.
* ``INTERRUPT_ROWS`` - a ``BaseException`` (Ctrl-C, Streamlit's rerun/stop) at some stage; the
  next run with the same cache equals a fresh run, and an interrupted refit leaves the score
  as it was.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from ood_core import eval as ev
from ood_core.config import RunConfig, ScenarioSpec, ScoreSpec
from ood_core.recorder import Recorder
from ood_core.runner import RunCache, run
from ood_core.scores import KNN, DeepMahalanobis, Gram, Softmax


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _hooks(net: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in net.modules()
    )


class Small(nn.Module):
    """conv -> bn -> relu -> conv -> pool -> fc, with optional in-place writes: ``inplace`` makes
    the ReLU write into the BatchNorm's output (as torchvision's ResNet does), ``edit_input``
    halves the input in place before using it."""

    def __init__(self, inplace: bool = False, edit_input: bool = False, halve: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)
        self.edit_input, self.halve = edit_input, halve
        with torch.no_grad():  # BN statistics that make its output negative in places
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        if self.edit_input:
            x.mul_(0.5)
        elif self.halve:
            x = x * 0.5
        h = self.relu(self.bn(self.conv(x)))
        h = self.relu(self.conv2(h))
        return self.fc(self.pool(h).flatten(1))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    calib = torch.rand(120, 1, 12, 12, generator=g)
    test = torch.rand(60, 1, 12, 12, generator=g)
    ood = (torch.rand(60, 1, 12, 12, generator=g) * 0.3) ** 2
    return calib, test, ood


def _scores() -> list:
    return [
        Softmax(),
        KNN(k=3),
        DeepMahalanobis(pooling="mean"),
        Gram(calib_labels="true"),
    ]


LAYERS = [(), [(1, 2)], [(1, 2)], [(1, 2), (1, 4)]]  # bn output (1-2), conv2 (1-4)


def _fit_and_score(net: nn.Module, data) -> list[np.ndarray]:
    """Confidences ``[(4, n_test), (4, n_ood)]`` of the four scores, seed API, no progress bars."""
    calib, test, ood = data
    pairs = list(zip(_scores(), LAYERS, strict=True))
    labels = torch.arange(len(calib)) % 3  # every class present
    fitted = ev.fit_scores(pairs, net, calib, labels, progress=False)
    ind, (out,) = ev.compute_confidence(fitted, test, [ood], progress=False)
    return [ind.numpy(), out.numpy()]


# ---------------------------------------------------------------------- nothing on the model
def _via_seed_api(net, data):
    calib, test, _ = data
    pairs = [(KNN(k=3), [(1, 4)]), (Softmax(), [])]
    fitted = ev.fit_scores(pairs, net, calib, progress=False)  # a plain network
    ev.compute_confidence(fitted, test, progress=False)


def _via_score_fit(net, data):
    calib, test, _ = data
    s = DeepMahalanobis(pooling="mean").fit(net, calib, layers=[(1, 4)])
    s(test)


def _via_recorder(net, data):
    rec = Recorder(net, input_data=data[0][:1]).record((1, 2), (1, 4))
    rec(data[1])


def _via_interrupted_pass(net, data):
    rec = Recorder(net, input_data=data[0][:1]).record((1, 2))

    def boom(*_):
        raise KeyboardInterrupt

    handle = net.fc.register_forward_hook(boom)
    try:
        with pytest.raises(KeyboardInterrupt):
            rec(data[1])
    finally:
        handle.remove()


STATE_ROWS: dict[str, Callable] = {
    "seed API on a plain network": _via_seed_api,
    "score.fit(net) then score(x)": _via_score_fit,
    "a Recorder's pass": _via_recorder,
    "a pass interrupted inside the network": _via_interrupted_pass,
}


@pytest.mark.parametrize("row", list(STATE_ROWS))
def test_nothing_is_left_on_the_users_model(row, data):
    net = Small()
    net.train()  # the user's mode must come back too
    keys, hooks = set(net.__dict__), _hooks(net)
    STATE_ROWS[row](net, data)
    assert set(net.__dict__) == keys
    assert _hooks(net) == hooks == 0
    assert net.training


# ---------------------------------------------------------------------- concurrency
def _seed_api_work(net, data):
    return _fit_and_score(net, data)


def _runner_work(net, _data):
    cache = RunCache()
    cache.models[("bundled", "tiniest")] = net
    cfg = RunConfig(
        n_calibration=150,
        n_test=100,
        scores=[
            ScoreSpec("Softmax"),
            ScoreSpec("KNN", {"k": 5}, ["1-11"]),
            ScoreSpec("Gram", {}, ["1-5", "1-11"]),
        ],
        scenarios=[ScenarioSpec(kind="vertical_flip")],
    )
    result = run(cfg, cache)
    return [result.confs_ind, *result.confs_oods]


CONCURRENT_ROWS = {"seed API, 4 scores": _seed_api_work, "runner.run, 3 scores": _runner_work}


@pytest.mark.parametrize("row", list(CONCURRENT_ROWS))
def test_concurrent_runs_on_one_model_equal_serial_runs(row, data, tiniest):
    work = CONCURRENT_ROWS[row]
    net = tiniest if "runner" in row else Small()
    serial = work(net, data)
    results: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def job(i: int) -> None:
        try:
            start.wait(timeout=30)
            results[i] = work(net, data)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(results) == [0, 1, 2]
    for got in results.values():
        for a, b in zip(got, serial, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)
    assert _hooks(net) == 0 and "_ood_lens_recorder" not in net.__dict__


# ---------------------------------------------------------------------- in-place writes
MUTATING_ROWS = {
    # name: (network writing in place, the same network without the in-place write)
    "ReLU(inplace=True) after a recorded BatchNorm": (
        lambda: Small(inplace=True),
        lambda: Small(inplace=False),
    ),
    "network halving its input in place": (
        lambda: Small(edit_input=True),
        lambda: Small(halve=True),
    ),
    "both": (
        lambda: Small(inplace=True, edit_input=True),
        lambda: Small(halve=True),
    ),
}


@pytest.mark.parametrize("row", list(MUTATING_ROWS))
def test_in_place_writes_change_neither_the_callers_tensors_nor_the_numbers(row, data):
    make_mutating, make_clean = MUTATING_ROWS[row]
    before = _digest(*data)
    got = _fit_and_score(make_mutating(), data)
    assert _digest(*data) == before  # calibration, test and OoD tensors untouched
    want = _fit_and_score(make_clean(), data)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)


def test_a_recorded_output_written_in_place_is_recorded_as_returned(data):
    x = data[1]
    net = Small(inplace=True)
    rec = Recorder(net, input_data=x[:1]).record((1, 2))
    rec(x)
    clean = Small(inplace=False)
    true_bn = clean.bn(clean.conv(x))
    assert float(true_bn.detach().min()) < -0.1  # the BN output has negative values...
    torch.testing.assert_close(rec.activations[(1, 2)], true_bn)  # ...and they are recorded
    assert rec.copied_layers == ((1, 2),)
    rec(x)  # later passes copy that layer at once: one network call per pass
    torch.testing.assert_close(rec.activations[(1, 2)], true_bn)


# ---------------------------------------------------------------------- interruptions
class Rerun(BaseException):
    """Stands for Streamlit's RerunException / StopException (BaseExceptions)."""


def _config() -> RunConfig:
    return RunConfig(
        n_calibration=150,
        n_test=80,
        scores=[
            ScoreSpec("Softmax"),
            ScoreSpec("KNN", {"k": 5}, ["1-11"]),
            ScoreSpec("DeepMahalanobis", {}, ["1-11"]),
        ],
        scenarios=[ScenarioSpec(kind="vertical_flip")],
    )


INTERRUPT_ROWS = {
    "Streamlit rerun while fitting": (Rerun, "Calibration"),
    "Ctrl-C while fitting": (KeyboardInterrupt, "Calibration"),
    "Streamlit stop while scoring": (Rerun, "Scoring"),
    "Ctrl-C while computing metrics": (KeyboardInterrupt, "Computing metrics"),
}


@pytest.fixture(scope="module")
def fresh_run():
    return run(_config(), RunCache())


@pytest.mark.parametrize("row", list(INTERRUPT_ROWS))
def test_an_interrupted_run_leaves_the_cache_usable(row, fresh_run):
    exc, stage = INTERRUPT_ROWS[row]
    cache = RunCache()

    def progress(what: str, frac: float) -> None:
        if what.startswith(stage):
            raise exc

    with pytest.raises(exc):
        run(_config(), cache, progress)
    assert all(s.fitted for s in cache.fitted.values())
    again = run(_config(), cache)
    fresh = fresh_run
    np.testing.assert_allclose(again.confs_ind, fresh.confs_ind, rtol=0, atol=1e-12)
    np.testing.assert_allclose(again.confs_oods[0], fresh.confs_oods[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, Rerun, RuntimeError])
def test_an_interrupted_refit_leaves_the_score_as_it_was(exc, data, monkeypatch):
    calib, test, _ = data
    net = Small()
    score = DeepMahalanobis(pooling="mean").fit(net, calib, layers=[(1, 4)])
    want = score(test)[1]
    state = {k: v for k, v in score.__dict__.items() if isinstance(v, torch.Tensor)}

    original = type(score)._fit

    def half_fit(self, features, logits, labels):
        original(self, features, logits, labels)  # new state written, then interrupted
        raise exc("interrupted")

    monkeypatch.setattr(type(score), "_fit", half_fit)
    with pytest.raises(exc):
        score.fit(net, calib[:50], layers=[(1, 4)])
    monkeypatch.undo()
    assert score.fitted
    for k, v in state.items():
        assert score.__dict__[k] is v
    torch.testing.assert_close(score(test)[1], want)
