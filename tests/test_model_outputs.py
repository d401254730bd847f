"""Models whose output holds the logits among other things (``(logits, feats)``, a dict, an
object, an HF-like ``ModelOutput``): the ``output`` selector (:func:`ood_core.core.select_output`)
keeps the network's own layer ids and gives the numbers of the equivalent plain model; a model
without a choice is refused before any pass, with a message listing what it returns. Also the
default input range ([0, 1] for a model that declares none)."""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torchinfo
from conftest import TinyConv
from torch import Tensor, nn
from torch.func import functional_call, grad

from ood_core import scores
from ood_core.core import (
    OutputError,
    base_net,
    exclusive_eval,
    net_lock,
    parse_output,
    predicted_classes,
    select_output,
)
from ood_core.eval import compute_confidence, fit_scores
from ood_core.evaluation import Evaluation
from ood_core.hub import check_compatible
from ood_core.inputs import check_inputs, expected_range
from ood_core.recorder import Recorder


class Plain(TinyConv):
    """conftest's TinyConv (ids 1-1 .. 1-5, logits only) with its pooled features exposed."""

    def features(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.flat(self.pool(self.relu(self.conv(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class Pair(Plain):
    """The same network returning ``(logits, feats)``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return self.fc(f), f


class Named(Plain):
    """The same network returning ``{"feats": ..., "logits": ...}``."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.features(x)
        return {"feats": f, "logits": self.fc(f)}


@dataclass
class Out:
    feats: Tensor
    logits: Tensor


class Attributes(Plain):
    """The same network returning an object with ``.feats`` and ``.logits``."""

    def forward(self, x: Tensor) -> Out:
        f = self.features(x)
        return Out(f, self.fc(f))


class ModelOutputLike(OrderedDict):
    """As HF ``ModelOutput``: an ordered mapping read by key or by position."""


class HfLike(Plain):
    def forward(self, x: Tensor) -> ModelOutputLike:
        f = self.features(x)
        return ModelOutputLike(logits=self.fc(f), hidden_states=f)


def same_weights(cls: type[Plain]) -> Plain:
    torch.manual_seed(0)
    ref = Plain().eval()
    net = cls().eval()
    net.load_state_dict(ref.state_dict())
    return net


@pytest.fixture()
def data() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(48, 1, 8, 8, generator=g)
    return x, torch.randint(0, 3, (48,), generator=g), torch.rand(16, 1, 8, 8, generator=g)


LISTING = r"a tuple of 2: \[0\] Tensor \(N, 3\), \[1\] Tensor \(N, 4\)"


# ---------------------------------------------------------------------------- the view
def test_the_view_has_the_networks_layer_table_and_leaves_it_untouched(data) -> None:
    x, _, _ = data
    plain, pair = same_weights(Plain), same_weights(Pair)
    before = (dict(vars(pair)), pair._modules.copy(), pair.training)
    view = select_output(pair, 0)
    assert select_output(pair, 0) is view and select_output(pair, None) is pair
    assert base_net(view) is pair and type(view).__name__ == "Pair"
    rec, ref = Recorder(pair, input_data=x[:1], output=0), Recorder(plain, input_data=x[:1])
    assert rec.net is view and rec.output == 0 and rec.output_problem is None
    table, expected = rec.layer_table(), ref.layer_table()
    assert table.drop(columns="type").equals(expected.drop(columns="type"))
    assert table["type"].tolist() == ["Pair", *expected["type"].tolist()[1:]]
    assert table["id"].tolist() == ["0-1", "1-1", "1-2", "1-3", "1-4", "1-5"]
    assert rec.head() == ref.head() == (1, 5) and rec.quick_picks() == ref.quick_picks()
    after = {k: v for k, v in vars(pair).items() if k != "calls"}  # its own counter
    assert after == {k: v for k, v in before[0].items() if k != "calls"}
    assert pair._modules == before[1]
    assert pair.training == before[2] and not any(m._forward_hooks for m in pair.modules())
    assert [k for k, _ in view.named_parameters()] == [k for k, _ in pair.named_parameters()]
    assert view.state_dict().keys() == pair.state_dict().keys()


def test_the_view_shares_mode_dtype_lock_and_metadata() -> None:
    pair = same_weights(Pair)
    pair.ood_lens = {"input_range": (-1, 1), "input_shape": (1, 8, 8)}
    view = select_output(pair, 0)
    assert view.ood_lens is pair.ood_lens and expected_range(view) == ((-1.0, 1.0), "declared")
    assert net_lock(view) is net_lock(pair) and net_lock(select_output(view, 0)) is net_lock(pair)
    pair.train()
    assert view.training
    with exclusive_eval(view):
        assert not pair.training and not pair.fc.training
    assert pair.training and pair.fc.training  # restored, on the user's network
    view.eval()
    assert not pair.training and not pair.conv.training
    view.double()
    assert pair.fc.weight.dtype == torch.float64 and view.fc.weight is pair.fc.weight
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    assert torch.equal(view(x), pair(x)[0])
    view.float()
    assert pair.conv.weight.dtype == torch.float32


def test_a_timm_vit_view_traces_and_differentiates_as_the_vit() -> None:
    """timm's ViT has top-level parameters (cls_token, pos_embed): the view's summary, parameter
    names and functional_call (GradNorm's per-sample gradients) are the ViT's."""
    from timm.models.vision_transformer import VisionTransformer

    class PairViT(VisionTransformer):
        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            f = self.forward_head(self.forward_features(x), pre_logits=True)
            return self.head(f), f

    kw = dict(img_size=16, patch_size=8, in_chans=1, num_classes=3, embed_dim=32, depth=1)
    torch.manual_seed(0)
    vit = VisionTransformer(num_heads=2, **kw).eval()
    pair = PairViT(num_heads=2, **kw).eval()
    pair.load_state_dict(vit.state_dict())
    view = select_output(pair, 0)
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    rows = [
        [(r.depth, r.depth_index, r.var_name, r.output_size) for r in s.summary_list]
        for s in (torchinfo.summary(m, input_data=x[:1], depth=100, verbose=0) for m in (vit, view))
    ]
    assert rows[0][1:] == rows[1][1:] and len(rows[0]) > 20  # row 0 names the class
    assert rows[1][0] == (0, 1, "PairViT", [1, 3]) and rows[0][0][3] == [1, 3]
    params = {k: v.detach() for k, v in view.named_parameters()}
    assert list(params)[:2] == ["cls_token", "pos_embed"]

    def loss(net: nn.Module, sub: dict[str, Tensor]) -> Tensor:
        return functional_call(net, {**params, **sub}, (x,)).logsumexp(1).sum()

    top = {k: params[k] for k in ("cls_token", "pos_embed", "head.weight")}
    g_view, g_vit = grad(lambda s: loss(view, s))(top), grad(lambda s: loss(vit, s))(top)
    for k in top:
        assert torch.equal(g_view[k], g_vit[k]) and g_view[k].abs().sum() > 0
    assert torch.equal(vit.cls_token, pair.cls_token)  # functional_call restored the tensors
    # GradNorm on the ViT's final norm (per-sample gradients through the view)
    xc = torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    rec = Recorder(vit, input_data=xc[:1])
    (norm,) = [lid for lid in rec.layer_ids if rec.layer_name(lid) == "norm"]  # final LayerNorm
    got, want = (
        fit_scores([(scores.GradNorm(), [norm])], m, xc, progress=False, **kw_out)
        for m, kw_out in ((pair, {"output": 0}), (vit, {}))
    )
    c_got, _ = compute_confidence(got, x, progress=False)
    c_want, _ = compute_confidence(want, x, progress=False)
    assert torch.equal(c_got, c_want)


# ---------------------------------------------------------------------------- same numbers
SCORES = [
    (lambda: scores.Softmax(), []),
    (lambda: scores.Energy(), []),
    (lambda: scores.ODIN(temperature=10.0, epsilon=0.01), []),
    (lambda: scores.GradNorm(), [(1, 5)]),  # closed form on the head
    (lambda: scores.GradNorm(), [(1, 1)]),  # per-sample gradients (functional_call)
    (lambda: scores.RankFeat(), [(1, 2)]),
    (lambda: scores.Odds(epsilon=0.05, noise_samples=4, rng_seed=1), []),
    (lambda: scores.FeatureSqueezing(squeezers=("bits:5", "median:2")), []),
    (lambda: scores.DeepMahalanobis(epsilon=0.01, pooling="mean", inverse="pinv"), [(1, 2)]),
    (lambda: scores.KNN(k=5), [(1, 4)]),
    (lambda: scores.ViM(dim=2), [(1, 5)]),
]


@pytest.mark.parametrize(
    ("cls", "output"), [(Pair, 0), (Named, "logits"), (Attributes, "logits"), (HfLike, 0)]
)
def test_every_kind_of_score_gives_the_plain_models_confidences(data, cls, output) -> None:
    x, y, xt = data
    got = fit_scores(
        [(make(), layers) for make, layers in SCORES],
        same_weights(cls),
        x,
        y,
        output=output,
        progress=False,
    )
    want = fit_scores(
        [(make(), layers) for make, layers in SCORES], same_weights(Plain), x, y, progress=False
    )
    (c_got, (o_got,)), (c_want, (o_want,)) = (
        compute_confidence(f, xt, oods=(xt.flip(2),), progress=False) for f in (got, want)
    )
    assert c_got.shape == (len(SCORES), 16)
    assert torch.equal(c_got, c_want) and torch.equal(o_got, o_want)


def test_a_score_fitted_on_a_recorder_with_output_reads_the_view(data) -> None:
    x, y, xt = data
    rnet = Recorder(same_weights(Pair), input_data=x[:1], output=0)
    rnet.record((1, 4))
    knn = scores.KNN(k=5).fit(rnet, x, y)
    ref = Recorder(same_weights(Plain), input_data=x[:1]).record((1, 4))
    want = scores.KNN(k=5).fit(ref, x, y)
    assert all(torch.equal(a, b) for a, b in zip(knn(xt), want(xt), strict=True))
    assert torch.equal(
        torch.as_tensor(predicted_classes(rnet.net, xt)), rnet.net(xt).argmax(1)
    ) and isinstance(rnet(xt), Tensor)


# ---------------------------------------------------------------------------- refusals
def test_a_model_returning_a_tuple_is_refused_before_any_pass(data) -> None:
    x, y, _ = data
    net = same_weights(Pair)
    how = (
        r"not logits \(N, n_classes\)\. Choose the element holding the logits: output=0 in "
        r"Python \(Recorder\(net, \.\.\., output=0\) or fit_scores\(\.\.\., output=0\)\), "
        r"`output = 0` under \[model\] in a run config, or the Output field of the "
        r"dashboard's model section\."
    )
    with pytest.raises(OutputError, match=rf"^The network returns {LISTING}, {how}$"):
        fit_scores([(scores.Energy(), [])], net, x, y, progress=False)
    assert net.calls == 1  # the trace of one example: no dataset pass
    rec = Recorder(net, input_data=x[:1])
    assert rec.output_problem.startswith("The network returns a tuple of 2: [0] Tensor (N, 3)")
    knn = scores.KNN(k=3)
    knn.layers = ((1, 4),)
    with pytest.raises(OutputError, match=LISTING):
        Evaluation(rec).fit([knn], x)
    assert net.calls == 2  # its own trace only
    named = same_weights(Named)
    with pytest.raises(OutputError, match=r"a dict of 2: \['feats'\] Tensor \(N, 4\), "):
        fit_scores([(scores.Energy(), [])], named, x, progress=False)
    with pytest.raises(OutputError, match=r"output='logits' in Python"):  # its suggestion
        fit_scores([(scores.Energy(), [])], named, x, progress=False)


BAD_OUTPUTS = [
    (Pair, 2, rf"^output=2 but the network returns {LISTING}\. Choose one of these \(e\.g\. "),
    (Pair, "logits", rf"^output='logits' but the network returns {LISTING}\."),
    (
        Named,
        "logit",
        r"^output='logit' but the network returns a dict of 2: \['feats'\] Tensor \(N, 4\), "
        r"\['logits'\] Tensor \(N, 3\)\. Choose one of these \(e\.g\. output='logits'\)\.$",
    ),
    (
        Attributes,
        "scores",
        r"^output='scores' but the network returns an Out of 2: \.feats Tensor \(N, 4\), "
        r"\.logits Tensor \(N, 3\)\.",
    ),
    (Plain, 0, r"^output=0 but the network returns a Tensor \(N, 3\) itself: leave output unset"),
    (Pair, 1, None),  # a 2-D tensor: taken as the logits (4 "classes")
]


@pytest.mark.parametrize(("cls", "output", "message"), BAD_OUTPUTS)
def test_a_bad_output_choice_names_what_the_network_returns(data, cls, output, message) -> None:
    x, _, _ = data
    net = same_weights(cls)
    if message is None:
        assert Recorder(net, input_data=x[:1], output=output).info((0, 1)).output_size == (1, 4)
        return
    with pytest.raises(OutputError, match=message):
        Recorder(net, input_data=x[:1], output=output)
    with pytest.raises(OutputError, match=message):
        fit_scores([(scores.Energy(), [])], net, x, output=output, progress=False)
    with pytest.raises(OutputError, match=rf"^Model 'm': {message.lstrip('^')}"):
        check_compatible(select_output(net, output), (1, 8, 8), 3, name="Model 'm'")


def test_an_element_that_is_no_logits_is_refused_with_the_listing() -> None:
    class Maps(Plain):
        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.fc(self.features(x)), self.relu(self.conv(x))

    net = same_weights(Maps)
    message = (
        r"output=1 selects Tensor \(N, 4, 8, 8\) of a tuple of 2: \[0\] Tensor \(N, 3\), \[1\] "
        r"Tensor \(N, 4, 8, 8\), not logits \(N, n_classes\): choose the element holding the "
        r"logits \(e\.g\. output=0\)\."
    )
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(OutputError, match=message):
        fit_scores([(scores.Energy(), [])], net, x, output=1, progress=False)
    with pytest.raises(OutputError, match=message):
        check_compatible(select_output(net, 1), (1, 8, 8))
    with pytest.raises(OutputError, match=rf"^m: The network returns {LISTING}"):
        check_compatible(same_weights(Pair), (1, 8, 8), name="m")


@pytest.mark.parametrize("output", [-1, True, "", "  ", 1.5, (0,)])
def test_output_must_be_an_index_or_a_key(output) -> None:
    with pytest.raises(ValueError, match=r"output must be an index >= 0 .* or a non-empty key"):
        select_output(same_weights(Pair), output)


def test_a_traced_recorder_takes_no_output_or_range_afterwards(data) -> None:
    x, _, _ = data
    rec = Recorder(same_weights(Pair), input_data=x[:1], output=0)
    with pytest.raises(ValueError, match=r"already traced: give output= and input_range= to"):
        fit_scores([(scores.Energy(), [])], rec, x, output=0, progress=False)


@pytest.mark.parametrize(
    ("text", "value"),
    [("", None), ("  ", None), ("0", 0), (" 12 ", 12), ("logits", "logits"), ("'3'", "3")],
)
def test_parse_output_reads_typed_choices(text, value) -> None:
    assert parse_output(text) == value and type(parse_output(text)) is type(value)


@pytest.mark.parametrize("text", ["-1", "''", '""'])
def test_parse_output_refuses_negative_indices_and_empty_keys(text) -> None:
    with pytest.raises(ValueError, match="output must be an index >= 0"):
        parse_output(text)


def test_threads_on_a_view_and_its_network_are_serialised(data) -> None:
    """A pass through the view and one through the network hold the same lock."""
    x, _, _ = data
    pair = same_weights(Pair)
    view = select_output(pair, 0)
    seen = []
    with net_lock(pair):
        t = threading.Thread(target=lambda: seen.append(predicted_classes(view, x)))
        t.start()
        t.join(0.2)
        assert t.is_alive() and not seen  # waits for the lock held on the network
    t.join()
    assert seen[0].tolist() == predicted_classes(same_weights(Plain), x).tolist()


# ---------------------------------------------------------------------------- input range
def test_undeclared_models_expect_inputs_in_0_1_unless_told(data) -> None:
    x, y, _ = data
    net = same_weights(Plain)
    normalised = (x - 0.5) / 0.2  # values in about [-2.5, 2.5]
    with pytest.raises(
        ValueError,
        match=r"^The inputs hold values in \[-2\.4\d+, 2\.49\d+\] but the model declares no input "
        r"range, so inputs in \[0, 1\] are assumed\. If the model takes other inputs \(e\.g\. "
        r"normalised ones\), pass input_range=\(-2\.5, 2\.5\) \(or input_range='any' to switch "
        r"this check off\) to Recorder\(\.\.\.\) or fit_scores\(\.\.\.\)\. [\d,]+ value\(s\) lie "
        r"outside \[0, 1\]",
    ):
        fit_scores([(scores.Energy(), [])], net, normalised, progress=False)
    assert net.calls == 0  # refused before the trace
    with pytest.raises(ValueError, match=r"\[0, 1\] are assumed \(0-255 images\? divide by 255\)"):
        fit_scores([(scores.Energy(), [])], net, x * 255, progress=False)
    fitted = fit_scores([(scores.Energy(), [])], net, normalised, input_range=(-2.5, 2.5))
    conf, _ = compute_confidence(fitted, normalised, progress=False)
    with pytest.raises(ValueError, match=r"but input_range=\(-2\.5, 2\.5\) was given"):
        compute_confidence(fitted, normalised * 2, progress=False)
    anything = fit_scores([(scores.Energy(), [])], net, normalised * 2, input_range="any")
    assert torch.equal(compute_confidence(anything, normalised, progress=False)[0], conf)


def test_a_declared_range_comes_first_and_a_given_range_overrides_it() -> None:
    net = same_weights(Plain)
    net.ood_lens = {"input_range": (-3, 3)}
    check_inputs(net, torch.full((2, 1, 8, 8), -2.0))  # declared: passes
    with pytest.raises(ValueError, match=r"the model expects inputs in \[-3, 3\]"):
        check_inputs(net, torch.full((2, 1, 8, 8), 4.0))
    check_inputs(net, torch.full((2, 1, 8, 8), 4.0), input_range=(0, 5))  # the user's range
    with pytest.raises(ValueError, match=r"but input_range=\(0, 1\) was given"):
        check_inputs(net, torch.full((2, 1, 8, 8), -2.0), input_range=(0, 1))
    check_inputs(net, torch.full((2, 1, 8, 8), 1e6), input_range="any")


@pytest.mark.parametrize("bad", [(1, 0), (0, float("inf")), "all", (0,), 5])
def test_input_range_must_be_two_ordered_numbers_or_any(bad) -> None:
    with pytest.raises(ValueError, match=r"input_range must be \(low, high\) with finite low < "):
        Recorder(same_weights(Plain), input_data=torch.rand(1, 1, 8, 8), input_range=bad)


# ---------------------------------------------------------------------------- config, CLI, bundle
HUBCONF = '''
import torch
from torch import nn

dependencies = ["torch"]


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.relu(self.conv(x)))))


class Pair(Plain):
    def forward(self, x):
        f = self.flat(self.pool(self.relu(self.conv(x))))
        return self.fc(f), f


def _make(cls):
    torch.manual_seed(0)
    ref, net = Plain(), cls()
    net.load_state_dict(ref.state_dict())
    return net.eval()


def plain():
    """Logits only."""
    return _make(Plain)


def pair():
    """(logits, feats)."""
    return _make(Pair)
'''


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("pair_hub")
    (folder / "hubconf.py").write_text(HUBCONF)
    return folder


def _config(hub_dir, entry: str, output=None):
    from ood_core.config import RunConfig, ScenarioSpec, ScoreSpec

    return RunConfig(
        model_repo=str(hub_dir),
        model_entry=entry,
        output=output,
        n_calibration=200,
        n_test=100,
        scores=[ScoreSpec("Energy"), ScoreSpec("KNN", {"k": 5}, ["1-4"])],
        scenarios=[ScenarioSpec(kind="vertical_flip")],
    )


def test_the_config_reads_writes_and_checks_model_output(hub_dir) -> None:
    from ood_core.config import ConfigError, RunConfig

    for output, line in ((0, "output = 0"), ("logits", 'output = "logits"')):
        cfg = _config(hub_dir, "pair", output)
        text = cfg.to_toml()
        assert line in text.split("[data]")[0]  # under [model]
        assert RunConfig.from_toml(text) == cfg and cfg.validate().output == output
        assert cfg.model_key() == (str(hub_dir), "pair", output)
    plain = _config(hub_dir, "plain")
    assert "output" not in plain.to_toml() and plain.model_key() == (str(hub_dir), "plain")
    expected = (
        r"expected the element of the model's output holding the logits: an index >= 0 \(0 for "
        r"a model returning \(logits, features\)\) or a key of at most 200 characters"
    )
    for value, shown in (("-1", r"-1 \(an integer\)"), ('""', r'"" \(a string\)')):
        with pytest.raises(ConfigError, match=rf"\[model\] output = {shown}: {expected}"):
            RunConfig.from_toml(f"[model]\noutput = {value}\n")
    for value, shown in (("true", r"true \(a boolean\)"), ("1.5", r"1\.5 \(a float\)")):
        with pytest.raises(ConfigError, match=rf"\[model\] output = {shown}: {expected}"):
            RunConfig.from_toml(f"[model]\noutput = {value}\n")


def test_runs_cli_and_bundles_honour_the_output(hub_dir, tmp_path, capsys) -> None:
    from ood_core.bundle import read_bundle, to_result
    from ood_core.cli import main
    from ood_core.runner import RunCache, run

    cache = RunCache()
    want = run(dataclasses.replace(_config(hub_dir, "plain"), trust_repo=True), cache)
    listing = r"a tuple of 2: \[0\] Tensor \(N, 10\), \[1\] Tensor \(N, 4\), not logits"
    with pytest.raises(OutputError, match=rf"^Model 'pair': The network returns {listing}"):
        run(dataclasses.replace(_config(hub_dir, "pair"), trust_repo=True), cache)
    cfg = dataclasses.replace(_config(hub_dir, "pair", 0), trust_repo=True)
    got = run(cfg, cache)
    assert np.array_equal(got.confs_ind, want.confs_ind) and got.accuracy == want.accuracy
    assert all(np.array_equal(a, b) for a, b in zip(got.confs_oods, want.confs_oods, strict=True))
    recorder = got.scores_and_layers[0][0].recorder_
    assert recorder.output == 0 and base_net(recorder.net) is cache.models[(str(hub_dir), "pair")]
    again = run(cfg, cache)  # cached: the same recorder and confidences
    assert again.scores_and_layers[0][0].recorder_ is recorder
    assert cache.network(cfg) is recorder.net
    path = tmp_path / "run.toml"
    path.write_text(_config(hub_dir, "pair", 0).to_toml())
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet", "--trust-repo"]) == 0
    capsys.readouterr()
    bundle = read_bundle(out)
    assert bundle.config.output == 0
    back = to_result(bundle, RunCache(), trust_repo=True)
    assert back.config.output == 0 and np.array_equal(back.confs_ind, want.confs_ind)


# ---------------------------------------------------------------------------- dashboard
def test_the_dashboard_state_reads_keeps_and_writes_the_output(hub_dir, tiniest) -> None:
    from ood_lens_app import form, layers, runs, sources, state

    s = state.default_state(env={}) | state.example_choices()
    assert (s["model_output"], s["w.model_output"], s["output_error"]) == (None, "", None)
    assert sources.apply_output(s, " 0 ") and s["model_output"] == 0 and s["output_error"] is None
    assert not sources.apply_output(s, "-1")
    assert s["model_output"] == 0  # the last good choice is kept
    assert s["output_error"].startswith("Output '-1': output must be an index >= 0")
    choices = layers.layer_choices(tiniest, torch.rand(1, 1, 28, 28))
    config, problems = form.build_config(s, choices)
    assert config is None and problems["run"] == [s["output_error"]]
    assert sources.apply_output(s, "logits") and s["model_output"] == "logits"
    assert sources.apply_output(s, "'7'") and s["model_output"] == "7"
    assert sources.apply_output(s, "") and s["model_output"] is None
    sources.apply_output(s, "0")
    config, problems = form.build_config(s, choices)
    assert problems == {} and config.output == 0 and config.validate().output == 0
    assert not runs.same_settings(config, dataclasses.replace(config, output=None))
    restored = state.default_state(env={})
    runs.apply_config(restored, dataclasses.replace(config, output="7"))
    assert (restored["model_output"], restored["w.model_output"]) == ("7", "'7'")
    from ood_lens_app.layout import sidebar_lines

    assert sidebar_lines(restored)[0] == "**Model:** `tiniest` (bundled hub), output `'7'`"


def test_the_model_page_takes_an_output_and_explains_bad_ones(hub_dir) -> None:
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    page = Path(__file__).resolve().parents[1] / "views" / "model_data.py"
    at = AppTest.from_file(str(page), default_timeout=120)
    at.session_state["w.n_test"] = 100
    at.run()
    at.radio(key="w.model_src").set_value("Local hub directory").run()
    at.text_input(key="w.local_dir").input(str(hub_dir)).run()
    at.text_input(key="w.local_entry").input("pair").run()
    at.checkbox(key=f"w.trust.{hub_dir}").check().run()
    at.button(key="load_model").click().run()
    errors = [e.value for e in at.error]
    assert not at.exception and len(errors) == 1, errors
    assert errors[0].startswith(
        "Model 'pair': The network returns a tuple of 2: [0] Tensor (N, 10)"
    )
    at.text_input(key="w.model_output").input("0").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.session_state["model_output"] == 0 and at.metric[0].label == "Test accuracy"
    assert "logits read from output `0`" in " ".join(m.value for m in at.markdown)
    at.text_input(key="w.model_output").input("2").run()
    errors = [e.value for e in at.error]
    assert not at.exception and len(errors) == 1, errors
    assert errors[0].startswith("Model 'pair': output=2 but the network returns a tuple of 2")
    at.text_input(key="w.model_output").input("-2").run()
    errors = [e.value for e in at.error]
    assert not at.exception and errors[0].startswith("Output '-2': output must be an index")
    assert at.text_input(key="w.model_output").value == "-2"  # what was typed stays
    assert at.session_state["model_output"] == 2
