"""Runaway parameters (issue 15): every parameter that scales work or memory has a declared bound
or a pre-flight estimate (:mod:`ood_core.budget`). One table row per parameter: the value that
would blow up is refused, fast (fit estimates before any forward pass), with the number in the
message; a sane value still works.

The memory limit is pinned (``OOD_LENS_MEMORY_LIMIT=4GB``) so that the rows refuse and accept the
same values on every machine.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from ood_core import budget
from ood_core.evaluation import Evaluation
from ood_core.perturbations import GaussianBlur, GaussianNoise, PatchShuffle
from ood_core.scores import (
    JTLA,
    KNN,
    LID,
    DeepMahalanobis,
    FeatureSqueezing,
    GradNorm,
    Gram,
    IsoMax,
    Odds,
    fDBD,
)

LIMIT = "4GB"
GB = r"~[\d.,]+ GB of memory but 4 GB are available \(OOD_LENS_MEMORY_LIMIT\)"


@pytest.fixture(autouse=True)
def pinned_limit(monkeypatch):
    monkeypatch.setenv(budget.ENV_VAR, LIMIT)


# ---------------------------------------------------------------------------- networks
class Small(nn.Module):
    """conv(1->8) -> relu -> pool -> flatten -> fc(8 -> 3) on 8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.relu(self.conv(x)))))


class Wide(Small):
    """The same with 512 channels: the conv output has 512 x 8 x 8 = 32,768 values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 512, 3, padding=1)
        self.fc = nn.Linear(512, 3)


class ManyClasses(nn.Module):
    """flatten -> hidden(64 -> 256) -> relu -> fc(256 -> 2,000 classes)."""

    def __init__(self, n_classes: int = 2000) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.hidden = nn.Linear(64, 256)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(256, n_classes)

    def forward(self, x):
        return self.fc(self.relu(self.hidden(self.flat(x))))


class BigLinear(nn.Module):
    """flatten -> small(64 -> 64) -> big(64 -> 4,096) -> relu -> fc(4,096 -> 3); ``big`` has 266k
    parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.small = nn.Linear(64, 64)
        self.big = nn.Linear(64, 4096)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4096, 3)

    def forward(self, x):
        return self.fc(self.relu(self.big(self.small(self.flat(x)))))


class Deep(nn.Module):
    """flatten -> 30 Linear(64 -> 64) layers -> fc(64 -> 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.blocks = nn.Sequential(*[nn.Linear(64, 64) for _ in range(30)])
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(self.blocks(self.flat(x)))


NETS: dict[str, nn.Module] = {}


def net(kind: str) -> nn.Module:
    if kind not in NETS:
        torch.manual_seed(0)
        NETS[kind] = {
            "small": Small,
            "wide": Wide,
            "classes": ManyClasses,
            "big": BigLinear,
            "deep": Deep,
        }[kind]().eval()
    return NETS[kind]


def limited(limit: str, fn: Callable[[], object]) -> object:
    """``fn()`` with the memory limit pinned to ``limit`` (then back to :data:`LIMIT`)."""
    os.environ[budget.ENV_VAR] = limit
    try:
        return fn()
    finally:
        os.environ[budget.ENV_VAR] = LIMIT


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def layer(rec, name: str):
    return next(lid for lid in rec.layer_ids if rec.layer_name(lid) == name)


def run(kind, score, layers=(), n_fit=60, n_test=0, batch_size=None, calls=None):
    """Fit ``score`` on ``n_fit`` images of ``net(kind)`` (labels 0, 1, 2, ...; ``layers`` by
    module name, or its default layers), then score ``n_test`` images; ``calls`` collects the
    forward passes after tracing."""
    model = net(kind)
    x = images(n_fit)
    ev = Evaluation.for_net(model, x)
    rec = ev.recorder
    lids = tuple(layer(rec, name) for name in layers) or score.default_layers(rec)
    score.layers = lids
    n_classes = rec.info((0, 1)).output_size[-1]
    y = torch.arange(n_fit) % min(3, n_classes)
    handle = None
    if calls is not None:
        handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # degenerate-fit warnings are tested elsewhere
            ev.fit([score], x, y, batch_size=batch_size)
            if n_test:
                ((_, conf),) = ev.confidences([score], images(n_test, 1), batch_size=batch_size)
                assert conf.shape[0] == n_test
    finally:
        if handle is not None:
            handle.remove()
    return score


# ---------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Row:
    """``bad()`` must raise ValueError matching ``message`` (within ``seconds``; with
    ``before_forward`` it receives a list that must stay empty: no forward pass ran); ``good()``
    must run."""

    id: str
    bad: Callable[[list], object]
    message: str
    good: Callable[[], object]
    before_forward: bool = True
    seconds: float = 20.0


ODDS = {"epsilon": 0.1}
SPEC = {"type": "multinomial", "mode": "mle", "k": 5}

ROWS = [
    # --- declared bounds (refused when the score is built)
    Row(
        "Gram max_gram_order bound",
        lambda c: Gram(max_gram_order=100_000),
        r"Gram: parameter 'max_gram_order' must be in \[1, 64\], got 100000",
        lambda: run("small", Gram(max_gram_order=64), ["conv"], n_test=8),
    ),
    Row(
        "JTLA n_classes_hint bound",
        lambda c: JTLA(test=SPEC, n_classes_hint=10**9),
        r"JTLA: parameter 'n_classes_hint' must be in \[2, 100000\], got 1000000000",
        lambda: run("small", JTLA(test=SPEC, n_classes_hint=5), ["fc"], n_test=8),
    ),
    Row(
        "JTLA n_classes_hint=1e9 (a float)",
        lambda c: JTLA(test=SPEC, n_classes_hint=1e9),
        r"JTLA: parameter 'n_classes_hint' must be an int in \[2, 100000\], got 1000000000.0 "
        r"\(float\)",
        lambda: JTLA(test=SPEC, n_classes_hint=100_000),
    ),
    Row(
        "IsoMax n_steps bound",
        lambda c: IsoMax(n_steps=10**7),
        r"IsoMax: parameter 'n_steps' must be in \[0, 100000\]",
        lambda: run("small", IsoMax(n_steps=5), n_test=8),
    ),
    Row(
        "perturbation seed bound",
        lambda c: GaussianNoise(seed=2**64),
        r"Gaussian noise: parameter 'seed' must be an int in \[0, 2\*\*64 - 1\]",
        lambda: GaussianNoise(seed=2**64 - 1)(images(2)),
    ),
    Row(
        "GaussianBlur sigma bound",
        lambda c: GaussianBlur(sigma=1000.0),
        r"Gaussian blur: parameter 'sigma' must be in \(0, 5\], got 1000",
        lambda: GaussianBlur(sigma=5.0)(images(2)),
    ),
    Row(
        "PatchShuffle patch bound",
        lambda c: PatchShuffle(patch=1000),
        r"Patch shuffle: parameter 'patch' must be in \[1, 32\], got 1000",
        lambda: PatchShuffle(patch=4)(images(2)),
    ),
    # --- pre-flight estimates of a fit (refused before any forward pass)
    Row(
        "Odds noise_samples",
        lambda c: run("wide", Odds(**ODDS, noise_samples=100_000), calls=c),
        r"Odds: a noisy forward pass of 1 input\(s\) x noise_samples=100,000 = 100,000 rows "
        rf"needs {GB}.*lower noise_samples or batch_size",
        lambda: run("wide", Odds(**ODDS, noise_samples=4), n_fit=12, n_test=4),
    ),
    Row(
        "Odds batch_size=0 (all noisy copies at once)",
        lambda c: run("wide", Odds(**ODDS, noise_samples=256, batch_size=0), n_fit=300, calls=c),
        rf"Odds: a noisy forward pass of 100 input\(s\) x noise_samples=256.*{GB}",
        lambda: run("wide", Odds(**ODDS, noise_samples=8, batch_size=0), n_fit=12, n_test=4),
    ),
    Row(
        "JTLA n_classes_hint memory",
        lambda c: run("small", JTLA(test=SPEC, n_classes_hint=100_000), ["fc"], calls=c),
        rf"JTLA.*class histograms and tests of 60 samples x 100,000 classes.*{GB}.*"
        r"lower n_classes_hint",
        lambda: run("small", JTLA(test=SPEC, n_classes_hint=50), ["fc"], n_test=4),
    ),
    Row(
        "JTLA layer_aggregation tuple sizes",
        lambda c: run(
            "deep",
            JTLA(test=SPEC, layer_aggregation="fisher:15"),
            [f"blocks.{i}" for i in range(30)],
            calls=c,
        ),
        rf"JTLA.*joint p-values of layer_aggregation 'fisher:15' over 30 layers.*{GB}.*"
        "smaller tuple sizes",
        lambda: run(
            "deep",
            JTLA(test=SPEC, layer_aggregation="fisher:2"),
            [f"blocks.{i}" for i in range(6)],
            n_test=4,
        ),
    ),
    Row(
        "Gram max_gram_order features",
        lambda c: run("wide", Gram(max_gram_order=64), ["conv"], n_fit=20_000, calls=c),
        rf"Gram: the float64 Gram features of 20,000 calibration samples \(32,768 statistics "
        rf"each, max_gram_order=64\) needs {GB}.*lower max_gram_order",
        lambda: run("wide", Gram(max_gram_order=2), ["conv"], n_fit=30, n_test=4),
    ),
    Row(
        "KNN feature bank",
        lambda c: run("wide", KNN(k=5), ["conv"], n_fit=20_000, calls=c),
        rf"KNN\(k=5\): the feature bank of 20,000 calibration samples x 32,768 dims.*{GB}",
        lambda: run("wide", KNN(k=5), ["pool"], n_fit=30, n_test=4),
    ),
    Row(
        "KNN k above the calibration size",
        lambda c: run("small", KNN(k=500), ["fc"], calls=c),
        r"KNN\(k=500\): k=500 neighbours but only 60 calibration samples",
        lambda: run("small", KNN(k=60), ["fc"], n_test=4),
    ),
    Row(
        "DeepMahalanobis covariance of a flattened layer",
        lambda c: run("wide", DeepMahalanobis(), ["conv"], calls=c),
        rf"DeepMahalanobis\(\) @ 1-1: 60 x 32,768 calibration features and their 32,768 x "
        rf"32,768 covariance needs {GB}.*pooling='mean'",
        lambda: run("wide", DeepMahalanobis(pooling="mean"), ["conv"], n_test=4),
    ),
    Row(
        "IsoMax with 2,000 classes",
        lambda c: run("classes", IsoMax(n_steps=1), n_fit=100, calls=c),
        rf"IsoMax fit: the \(100, 2,000, 2,000\) logit-prototype differences needs {GB}",
        lambda: run("small", IsoMax(n_steps=1), n_test=4),
    ),
    Row(
        "fDBD head of 2,000 classes",
        lambda c: run("classes", fDBD(), ["fc"], calls=c),
        rf"fDBD\(\): the \(2,000, 2,000, 256\) float64 differences of the head's weight rows "
        rf"needs {GB}",
        lambda: run("small", fDBD(), ["fc"], n_test=4),
    ),
    Row(  # chunked per-sample gradients: the batch size no longer matters, the layer does
        "GradNorm per-sample gradients of a large layer",
        lambda c: limited("4MB", lambda: run("big", GradNorm(), ["big"], calls=c)),
        r"GradNorm\(\): the per-sample gradients w\.r\.t\. the 266,240 parameters of 1-3 "
        r"\(big\), 1 input\(s\) at a time .*needs ~[\d.]+ GB of memory but 0\.004 GB are "
        r"available \(OOD_LENS_MEMORY_LIMIT\); choose a layer with fewer parameters \(e\.g\. "
        r"the head 1-5",
        lambda: run("big", GradNorm(), ["big"], n_fit=300, batch_size=1024),  # 2 chunks
    ),
    # --- estimates right before the work (after the shared forward pass)
    Row(
        "FeatureSqueezing median window",
        lambda c: run("small", FeatureSqueezing(squeezers=["median:400"]), n_fit=200),
        rf"median squeezing 'median:400' of a batch of 200 inputs.*{GB}.*smaller median window",
        lambda: run("small", FeatureSqueezing(squeezers=["median:8"]), n_fit=20, n_test=4),
        before_forward=False,
    ),
    Row(
        "LID k at scoring time",
        lambda c: run("wide", LID(k=150), ["conv"], n_fit=200, n_test=1024),
        rf"LID\(k=150\): the search of the k=150 nearest neighbours of 1,024 samples.*{GB}.*"
        "lower k or use pooling='mean'",
        lambda: run("wide", LID(k=5), ["conv"], n_fit=40, n_test=4),
        before_forward=False,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_runaway_value_is_refused_fast_with_the_number(row):
    calls: list = []
    start = time.perf_counter()
    with pytest.raises(ValueError, match=row.message):
        row.bad(calls)
    assert time.perf_counter() - start < row.seconds
    if row.before_forward:
        assert calls == [], "refused only after a forward pass"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_sane_value_still_works(row):
    row.good()


# ---------------------------------------------------------------------------- the mechanism
def test_limit_comes_from_the_environment_or_the_machine(monkeypatch):
    assert budget.memory_limit() == (4e9, budget.ENV_VAR)
    for text, expected in (("512MiB", 2**29), ("2e9", 2e9), ("1.5 GB", 1.5e9), ("off", None)):
        monkeypatch.setenv(budget.ENV_VAR, text)
        limit, _ = budget.memory_limit()
        assert limit == (float("inf") if expected is None else expected)
    monkeypatch.setenv(budget.ENV_VAR, "lots")
    with pytest.raises(ValueError, match=r"OOD_LENS_MEMORY_LIMIT='lots' is not a memory size"):
        budget.memory_limit()
    monkeypatch.delenv(budget.ENV_VAR)
    limit, source = budget.memory_limit()
    assert 0 < limit < float("inf") and source in ("MemAvailable", "the container's memory limit")
    with pytest.raises(budget.BudgetError, match=r"needs ~[\d,]+ GB .*OOD_LENS_MEMORY_LIMIT overr"):
        budget.check_budget("a test", 1e21, "do less")
    budget.check_budget("a test", 1, "nothing")  # fits


def test_estimates_are_off_with_the_override(monkeypatch):
    monkeypatch.setenv(budget.ENV_VAR, "off")
    budget.check_budget("anything", 1e30, "never")
    JTLA(test=SPEC, n_classes_hint=100_000).check_calibration(60)  # no network bound: hint only


def test_unbound_score_checks_its_hint_alone():
    """The dashboard checks a score before any network is loaded: the hint is enough."""
    with pytest.raises(ValueError, match=r"100,000 classes.*needs ~[\d.,]+ GB"):
        JTLA(test=SPEC, n_classes_hint=100_000).check_calibration(60)
    Odds(**ODDS, noise_samples=100_000).check_calibration(60)  # needs the network: no estimate


def test_forward_estimate_is_close_to_the_measured_peak(tiniest):
    """The per-row estimate of a forward pass (Odds' noisy passes) on the bundled model: the
    measured ~260 KB per row (no_grad, float32), estimated within 20%."""
    from ood_core.recorder import Recorder

    rec = Recorder(tiniest, input_data=torch.rand(1, 1, 28, 28))
    per_row = budget.forward_bytes_per_sample(rec)
    assert 260e3 * 0.9 < per_row < 260e3 * 1.3
