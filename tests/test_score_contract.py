"""One contract, checked for every registered score (in the spirit of scikit-learn's
``parametrize_with_checks``): build from declarations, fit on suggested layers, finite
``(n, n_classes)`` conformities, config round trip, unfit on parameter change, invalid values
rejected with a message naming the score and the parameter, and the invariances that apply."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from ood_core.core import predicted_confidence
from ood_core.evaluation import Evaluation
from ood_core.params import Param
from ood_core.scores import SCORES, make_score

N_CLASSES = 3


class BlockNet(nn.Module):
    """conv -> [block: conv, relu, conv] -> relu -> pool -> flatten -> fc(8 -> 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8, N_CLASSES)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.relu(self.block(self.stem(x))))))


class Shifted(nn.Module):
    """The same network with a constant added to every logit."""

    def __init__(self, net: nn.Module, shift: float) -> None:
        super().__init__()
        self.net, self.shift = net, shift

    def forward(self, x):
        return self.net(x) + self.shift


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return BlockNet().eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(240, 1, 8, 8, generator=g)
    return x[:180], torch.arange(180) % N_CLASSES, x[180:]


def build(cls, **override):
    """The score built from its declared defaults (required values: their declared suggestion)."""
    values = {p.name: p.default for p in cls.all_params() if p.required}
    return cls(**values | override)


def fit_and_score(score, net, data):
    x_fit, y_fit, x = data
    engine = Evaluation.for_net(net, x_fit)
    score.layers = score.check_layers(score.suggest_layers(engine.recorder), engine.recorder)
    engine.fit([score], x_fit, y_fit)
    ((logits, conf),) = engine.confidences([score], x)
    return logits, conf


NAMES = sorted(SCORES)


@pytest.mark.parametrize("name", NAMES)
def test_builds_fits_and_returns_finite_conformity(name, net, data):
    score = build(SCORES[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate-fit warnings are tested elsewhere
        logits, conf = fit_and_score(score, net, data)
    n = len(data[2])
    assert logits.shape == (n, N_CLASSES)
    assert conf.shape == (n, N_CLASSES)
    # A non-finite conformity is allowed only when the fit said why (e.g. a singular covariance
    # inverted as the reference does gives -inf): never silently.
    assert torch.isfinite(conf).all() or score.fit_warnings, f"{name}: non-finite conformity"
    assert score.fitted or not score.needs_fit


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name):
    score = build(SCORES[name])
    again = make_score(**score.config())
    assert again == score
    assert again.config() == score.config()
    assert again.full_repr() == score.full_repr()


def _other_valid_value(p: Param):
    if p.default is None and p.type in ("int", "float"):
        return type(1 if p.type == "int" else 1.0)((p.low or 0) + 1) + (p.type == "float")
    if p.type == "bool":
        return not p.default
    if p.type == "choice":
        return next(c for c in p.choices if c != p.default)
    if p.type == "int" and p.default is not None:
        return p.default + 1 if p.high is None or p.default + 1 <= p.high else p.default - 1
    if p.type == "float" and p.default is not None and math.isfinite(p.default):
        step = 0.5 * p.default if p.default else 0.1
        value = p.default + step
        return value if p.high is None or value < p.high else p.default - abs(step) / 2
    return None


@pytest.mark.parametrize("name", NAMES)
def test_parameter_change_unfits_except_mode(name, net, data):
    cls = SCORES[name]
    score = build(cls)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_and_score(score, net, data)
    if not score.needs_fit:
        return
    assert score.fitted
    score.mode = "diff"
    assert score.fitted, "mode is post-processing: it keeps the fit"
    changed = 0
    for p in (p for p in cls.all_params() if p.name != "mode"):
        value = _other_valid_value(p)
        if value is None:
            continue
        try:
            setattr(score, p.name, value)
        except ValueError:  # a cross-parameter rule refused this combination; try the next one
            continue
        assert not score.fitted, f"{name}: changing {p.name} kept the fit"
        changed += 1
        break
    assert changed, f"{name}: no parameter could be changed"


def _invalid_values(p: Param):
    if p.type == "bool":
        yield "yes"
    elif p.type == "choice":
        yield "__not_a_choice__"
    elif p.type in ("int", "float"):
        yield "12"
        if p.type == "int":
            yield 1.5
        if p.nonzero:
            yield 0 if p.type == "int" else 0.0
        if p.low is not None:
            yield p.low if p.low_exclusive else p.low - 1
        if p.high is not None:
            yield p.high if p.high_exclusive else p.high + 1
    elif p.type == "list":
        yield 3.0


@pytest.mark.parametrize("name", NAMES)
def test_invalid_values_are_rejected_naming_score_and_parameter(name):
    cls = SCORES[name]
    checked = 0
    for p in cls.all_params():
        for bad in _invalid_values(p):
            with pytest.raises(ValueError) as info:
                build(cls, **{p.name: bad})
            message = str(info.value)
            assert name in message and p.name in message, (p.name, bad, message)
            checked += 1
    assert checked >= 2  # act_norm and mode at least


@pytest.mark.parametrize("name", NAMES)
def test_unknown_parameter_is_rejected_with_the_accepted_names(name):
    with pytest.raises(ValueError, match=rf"{name}.*unknown parameter"):
        build(SCORES[name], not_a_parameter=1)


SHIFT_INVARIANT = (
    "Softmax",
    "Logit",
    "Energy",
    "Entropy",
    "GEN",
    "TemperatureScaling",
    "KLMatching",
    "ODIN",
)


@pytest.mark.parametrize("name", SHIFT_INVARIANT)
def test_ranking_invariant_to_a_constant_added_to_the_logits(name, net, data):
    """Scores of the softmax/max-logit/energy family rank samples the same way when every logit
    is shifted by the same constant."""
    torch.manual_seed(0)
    base = predicted_confidence(*fit_and_score(build(SCORES[name]), net, data))
    torch.manual_seed(0)
    shifted = predicted_confidence(*fit_and_score(build(SCORES[name]), Shifted(net, 7.0), data))
    assert spearmanr(base.numpy(), shifted.numpy()).statistic > 0.9999


class DeadBranch(nn.Module):
    """A network with a layer whose output is the same for every input (multiplied by zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.dead = nn.Linear(4, 2)
        self.fc = nn.Linear(4, N_CLASSES)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc(x) + 0 * self.dead(x * 0).sum(1, keepdim=True)


def test_a_layer_that_contributes_nothing_warns_naming_score_and_layer():
    from ood_core.diagnostics import OodLensWarning
    from ood_core.scores import KNN

    torch.manual_seed(0)
    net = DeadBranch().eval()
    x = torch.rand(40, 1, 2, 2)
    engine = Evaluation.for_net(net, x)
    dead = next(
        lid for lid in engine.recorder.layer_ids if engine.recorder.layer_name(lid) == "dead"
    )
    score = KNN(k=3)
    score.layers = (dead,)
    with pytest.warns(
        OodLensWarning,
        match=rf"KNN @ {dead[0]}-{dead[1]}: the activation of "
        r"layer 'dead' is the same for all 40 calibration samples",
    ):
        engine.fit([score], x)
    assert score.fit_warnings and "choose another layer" in score.fit_warnings[0]
    live = KNN(k=3)
    live.layers = (engine.recorder.quick_picks()["logits"][0],)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OodLensWarning)
        engine.fit([live], x)  # a healthy layer does not warn
    assert live.fit_warnings == []


def test_tied_confidences_on_a_set_warn_naming_score_and_set(net, data):
    from ood_core.diagnostics import OodLensWarning
    from ood_core.scores import Energy

    score = Energy(mode="diff")  # one value per sample: "diff" is always 0
    x_fit, y_fit, x = data
    engine = Evaluation.for_net(net, x_fit)
    engine.fit([score], x_fit, y_fit)
    with pytest.warns(
        OodLensWarning, match=r"Energy: all 60 confidences on 'my set' are identical"
    ):
        engine.confidences([score], x, dataset="my set")


@pytest.mark.parametrize("name", NAMES)
def test_signature_lists_the_declared_parameters(name):
    import inspect

    cls = SCORES[name]
    sig = inspect.signature(cls)
    assert list(sig.parameters) == [p.name for p in cls.all_params()]
    for p in cls.all_params():
        expected = inspect.Parameter.empty if p.required else p.default
        assert sig.parameters[p.name].default == expected, (name, p.name)


@pytest.mark.parametrize("name", NAMES)
def test_default_layers_are_allowed_and_fit(name, net, data):
    cls = SCORES[name]
    rec = Evaluation.for_net(net, data[0]).recorder
    allowed = cls.allowed_layers(rec)
    defaults = cls.default_layers(rec)
    assert set(defaults) <= set(allowed)
    if cls.layer_rule == "none":
        assert allowed == [] and defaults == ()
    else:
        assert defaults, f"{name} proposes no layer on a network with a head and a block"
        assert (0, 1) not in allowed


def test_calibration_too_small_for_k_fails_before_any_forward_pass(data):
    from ood_core.scores import JTLA, KNN

    torch.manual_seed(0)
    counting = BlockNet().eval()
    calls = []
    counting.register_forward_hook(lambda *a: calls.append(1))
    ev = Evaluation.for_net(counting, data[0])
    calls.clear()
    for score in (KNN(k=500), JTLA(test={"type": "multinomial", "mode": "mle", "k": 400})):
        score.layers = ((1, 2),)
        with pytest.raises(
            ValueError,
            match=rf"{type(score).__name__}.*k=\d+ neighbours but only "
            r"180 calibration samples",
        ):
            ev.fit([score], data[0], data[1])
    assert calls == []
