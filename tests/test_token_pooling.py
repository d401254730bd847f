"""Token and sequence activations (issue #16, item 3): the poolings ``flatten`` / ``mean`` /
``cls`` on 3-D ``(N, L, D)`` ViT-style tokens and 4-D maps, their refusals and their remedies.

Features are checked against hand computations (``x[:, 0]``, ``x.mean(1)``) on activations
read from the network itself, so nothing here trusts the library's own pooling.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from ood_core import budget
from ood_core.diagnostics import OodLensWarning
from ood_core.evaluation import Evaluation
from ood_core.recorder import Recorder
from ood_core.scores import (
    JTLA,
    KNN,
    LID,
    DeepMahalanobis,
    DkNN,
    MultiMahalanobis,
    NNGuide,
    RelativeMahalanobis,
    Trust,
)
from ood_core.scores.features import (
    POOLINGS,
    feature_dims,
    pool,
    pool_features,
    pooled_size,
    pooling_remedy,
)

D = 6
EMBED, BLOCK1, BLOCK2, HEAD = (1, 1), (2, 1), (2, 2), (1, 4)


class Block(nn.Module):
    """A pre-norm residual mixer block on 17 tokens: token mixing (a Linear over the tokens, so
    the CLS token sees the patches), then a per-token MLP."""

    def __init__(self, d: int, n_tokens: int = 17) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mix = nn.Linear(n_tokens, n_tokens)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t + self.mix(self.norm1(t).transpose(1, 2)).transpose(1, 2)
        return t + self.mlp(self.norm2(t))


class TokenNet(nn.Module):
    """ViT-like: (N, 1, 8, 8) -> conv patch embedding (N, D, 4, 4) -> CLS + 16 patch tokens
    (N, 17, D) -> 2 blocks -> LayerNorm -> head on the CLS token (N, 3)."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, d, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)
        return self.head(self.norm(self.blocks(t))[:, 0])


@pytest.fixture(scope="module")
def net() -> TokenNet:
    torch.manual_seed(0)
    return TokenNet().eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def recorded(net: nn.Module, x: torch.Tensor, layer) -> torch.Tensor:
    """The layer's activation on ``x``, read with a plain forward hook (not the library)."""
    out = {}
    module = {(2, 1): net.blocks[0], (2, 2): net.blocks[1], (1, 1): net.embed}[layer]
    handle = module.register_forward_hook(lambda m, a, o: out.setdefault("a", o.detach()))
    with torch.no_grad():
        net(x)
    handle.remove()
    return out["a"]


def test_layer_ids_and_shapes_of_the_token_model(net):
    rec = Recorder(net, input_data=images(1, 0))
    assert [rec.layer_name(lid) for lid in (EMBED, BLOCK1, BLOCK2, HEAD)] == [
        "embed",
        "blocks.0",
        "blocks.1",
        "head",
    ]
    assert tuple(rec.info(BLOCK2).output_size) == (1, 17, D)
    assert tuple(rec.info(EMBED).output_size) == (1, D, 4, 4)


def test_pool_is_the_hand_computation():
    x = torch.randn(5, 17, D)
    assert POOLINGS == ("flatten", "mean", "cls")
    assert torch.equal(pool(x, "cls"), x[:, 0])
    assert torch.equal(pool(x, "mean"), x.mean(1))
    assert torch.equal(pool(x, "flatten"), x.reshape(5, 17 * D))
    m = torch.randn(5, 4, 3, 2)
    assert torch.equal(pool(m, "mean"), m.mean((2, 3)))
    assert torch.equal(pool(m, "mean"), pool_features(m, m.dtype))
    assert pool(x, "mean", torch.float64).dtype == torch.float64
    # the activation-shaping pooling still flattens 3-D outputs (it reproduces the head's input)
    assert torch.equal(pool_features(x, x.dtype), x.reshape(5, -1))
    # cls flattens what is not 3-D (a token block and a pooled 2-D layer are read together)
    assert torch.equal(pool(m, "cls"), m.reshape(5, -1))


def test_pooled_sizes_used_by_the_estimates(net):
    rec = Recorder(net, input_data=images(1, 0))
    assert [pooled_size((1, 17, D), p) for p in POOLINGS] == [17 * D, D, D]
    assert [pooled_size((1, 8, 4, 4), p) for p in ("flatten", "mean")] == [128, 8]
    assert pooled_size((1, 8, 1, 1), "mean") == 8 and pooled_size((1, 3), "mean") == 3
    assert feature_dims(rec, (EMBED, BLOCK2), "flatten") == 4 * 4 * D + 17 * D
    assert feature_dims(rec, (EMBED, BLOCK2), "mean") == D + D


@pytest.mark.parametrize("pooling", ["cls", "mean", "flatten"])
def test_knn_features_and_conformity_equal_a_hand_computation(net, pooling):
    cal, test = images(40, 1), images(7, 2)
    hand = {
        "cls": lambda a: a[:, 0],
        "mean": lambda a: a.mean(1),
        "flatten": lambda a: a.flatten(1),
    }
    c = hand[pooling](recorded(net, cal, BLOCK2)).double().numpy()
    q = hand[pooling](recorded(net, test, BLOCK2)).double().numpy()
    score = KNN(k=3, pooling=pooling, act_norm=None)
    ev = Evaluation.for_net(net, cal)
    score.layers = (BLOCK2,)
    ev.fit([score], cal)
    ((_, conf),) = ev.confidences([score], test)
    d2 = ((q[:, None, :] - c[None]) ** 2).sum(-1)
    np.testing.assert_allclose(conf[:, 0].numpy(), -np.sort(d2, 1)[:, 2], rtol=1e-4, atol=1e-5)
    assert score.index_.d == {"cls": D, "mean": D, "flatten": 17 * D}[pooling]


def test_every_pooled_score_reads_the_same_token_features(net):
    cal = images(30, 3)
    a = recorded(net, cal, BLOCK1)
    ev = Evaluation.for_net(net, cal)
    acts = {BLOCK1: a}
    for cls_ in (LID, Trust, DkNN, NNGuide):
        kw = {"k": 3} if cls_ is not Trust else {"alpha": 0.0}
        s = cls_(**kw, pooling="cls")
        s.bind(ev.recorder, (BLOCK1,))
        assert torch.equal(next(iter(s._features(acts).values())), a[:, 0].float()), cls_
    jt = JTLA(test={"type": "multinomial", "mode": "mle", "k": 3}, pooling="mean")
    jt.bind(ev.recorder, (BLOCK1,))
    torch.testing.assert_close(jt._features(acts)[BLOCK1], a.mean(1))
    for s in (DeepMahalanobis(pooling="cls"), RelativeMahalanobis(pooling="mean")):
        s.bind(ev.recorder, (BLOCK1,))
        want = a[:, 0] if s.pooling == "cls" else a.mean(1)
        torch.testing.assert_close(s.layer_features(a, BLOCK1), want)
    # scores that pool by default (pooling='mean') average the tokens
    multi, guide = MultiMahalanobis(), NNGuide(k=3)
    assert multi.pooling == guide.pooling == "mean"
    torch.testing.assert_close(multi.layer_features(a), a.mean(1).double())
    guide.bind(ev.recorder, (BLOCK1,))
    torch.testing.assert_close(guide._features(acts)[BLOCK1], a.mean(1))


def test_mahalanobis_on_cls_tokens_equals_numpy(net):
    cal, test = images(60, 4), images(9, 5)
    y = torch.arange(60) % 3
    h = recorded(net, cal, BLOCK2)[:, 0].double().numpy()
    t = recorded(net, test, BLOCK2)[:, 0].double().numpy()
    score = DeepMahalanobis(pooling="cls", inverse="pinv")
    score.layers = (BLOCK2,)
    ev = Evaluation.for_net(net, cal)
    ev.fit([score], cal, y)
    ((_, conf),) = ev.confidences([score], test)
    means = np.stack([h[y.numpy() == c].mean(0) for c in range(3)])
    r = h - means[y.numpy()]
    prec = np.linalg.inv(r.T @ r / (len(h) - 1))
    diff = t[:, None, :] - means[None]
    want = -np.einsum("nkd,de,nke->nk", diff, prec, diff)
    np.testing.assert_allclose(conf.numpy(), want, rtol=1e-6)
    assert score.gaussians[0].whiten.shape[0] == D


# ---------------------------------------------------------------------------- refusals
def _fit_counting(net, score, layers, n=20):
    calls = []
    handle = net.register_forward_hook(lambda *a: calls.append(1))
    try:
        score.layers = layers
        ev = Evaluation.for_net(net, images(n, 6))
        calls.clear()  # the trace above is not a calibration pass
        ev.fit([score], images(n, 6), torch.arange(n) % 3)
    finally:
        handle.remove()
    return calls


def test_cls_on_a_layer_that_is_not_tokens_is_refused_before_any_pass(net):
    calls: list = []
    with pytest.raises(ValueError) as info:
        calls = _fit_counting(net, KNN(k=2, pooling="cls"), (EMBED, BLOCK2))
    assert str(info.value) == (
        "KNN(k=2, pooling='cls'): pooling='cls' takes token 0 of a 3-D (N, L, D) token output "
        "(ViT / DeiT blocks), but 1-1 (embed, output (N, 6, 4, 4)) is not 3-D; use "
        "pooling='mean' (a 4-D map averaged over H, W) or a token layer."
    )
    assert calls == []
    with pytest.raises(ValueError) as info:
        _fit_counting(net, DeepMahalanobis(pooling="cls"), (HEAD,))
    assert str(info.value) == (
        "DeepMahalanobis(pooling='cls'): pooling='cls' takes token 0 of a 3-D (N, L, D) token "
        "output (ViT / DeiT blocks), but 1-4 (head, output (N, 3)) is not 3-D; use "
        "pooling='flatten' or a token layer."
    )
    with pytest.raises(ValueError, match=r"MultiMahalanobis\(pooling='cls'\).*1-4 \(head"):
        _fit_counting(net, MultiMahalanobis(pooling="cls"), (HEAD,))


def test_cls_on_a_token_block_and_the_head_reads_token_0_and_the_head_flattened(net):
    """A mixed choice (JTLA's default on a ViT: the last block and the pooled feature) is not
    refused: cls applies to the token layer, the 2-D layer is read whole."""
    assert _fit_counting(net, KNN(k=2, pooling="cls"), (BLOCK2, HEAD)) != []
    rec = Recorder(net, input_data=images(1, 0)).record(BLOCK2, HEAD)
    x = images(4, 1)
    with torch.no_grad():
        rec(x)
    assert feature_dims(rec, (BLOCK2, HEAD), "cls") == D + 3
    block, head = rec.activations[BLOCK2], rec.activations[HEAD]
    assert torch.equal(pool(block, "cls"), block[:, 0]) and torch.equal(pool(head, "cls"), head)


def test_a_chosen_mean_that_changes_nothing_is_refused_a_default_one_is_not(net):
    with pytest.raises(ValueError) as info:
        _fit_counting(net, LID(k=2, pooling="mean"), (HEAD,))
    assert str(info.value) == (
        "LID(k=2, pooling='mean'): pooling='mean' changes nothing on 1-4 (head, output (N, 3)): "
        "it averages 4-D (N, C, H, W) maps over H, W and 3-D (N, L, D) tokens over L, which this "
        "layer does not have (the features are those of pooling='flatten'); use "
        "pooling='flatten' or choose a feature map or token layer."
    )
    with pytest.raises(ValueError, match=r"DkNN\(k=2, pooling='mean'\): pooling='mean' changes"):
        _fit_counting(net, DkNN(k=2, pooling="mean"), (HEAD,))
    # one layer where it applies is enough; a default 'mean' is never refused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OodLensWarning)
        _fit_counting(net, LID(k=2, pooling="mean"), (BLOCK1, HEAD))
        _fit_counting(net, NNGuide(k=2), (HEAD,))
        _fit_counting(net, MultiMahalanobis(), (HEAD,), n=60)
        # the dashboard / config round trip passes every value explicitly: still the default
        _fit_counting(net, NNGuide(k=2, pooling="mean"), (HEAD,))


# ---------------------------------------------------------------------------- remedies
def test_remedies_name_only_what_applies_to_the_shape():
    assert pooling_remedy([(1, 8, 7, 7)], "flatten") == "pooling='mean' (fewer dims)"
    assert pooling_remedy([(1, 17, 6)], "flatten") == (
        "pooling='cls' or pooling='mean' (over tokens, fewer dims)"
    )
    assert pooling_remedy([(1, 17, 6), (1, 8, 7, 7)], "flatten") == "pooling='mean' (fewer dims)"
    assert pooling_remedy([(1, 512)], "flatten") is None
    assert pooling_remedy([(1, 8, 1, 1)], "flatten") is None
    assert pooling_remedy([(1, 17, 6)], "mean") is None  # never the pooling in use (or cls)
    assert pooling_remedy([(1, 8, 7, 7)], "flatten", offered=False) is None


def test_singular_covariance_warnings_suggest_the_token_poolings(net):
    def messages(score, layers):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _fit_counting(net, score, layers, n=30)  # 17 x 6 = 102 dims for 30 samples
        return [str(w.message) for w in caught if issubclass(w.category, OodLensWarning)]

    (msg,) = [m for m in messages(DeepMahalanobis(), (BLOCK2,)) if "singular" in m]
    assert msg.startswith("DeepMahalanobis @ 2-2: 102 feature dimensions for 30 samples")
    assert msg.endswith(
        ": try pooling='cls' or pooling='mean' (over tokens, fewer dims) or inverse='pinv'"
    )
    (msg,) = [m for m in messages(DeepMahalanobis(inverse="pinv"), (EMBED,)) if "singular" in m]
    assert msg.endswith(": try pooling='mean' (fewer dims) or more calibration samples")
    wide = TokenNet(d=40).eval()  # 40 dims of CLS token for 30 samples: still singular
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit_counting(wide, DeepMahalanobis(pooling="cls"), (BLOCK2,), n=30)
    (msg,) = [str(w.message) for w in caught if "singular" in str(w.message)]
    assert msg.endswith(": calibrate on more samples, or try inverse='pinv'")  # no pooling left


def test_feature_bank_refusal_uses_pooled_dims_and_the_token_remedy(net, monkeypatch):
    monkeypatch.setenv(budget.ENV_VAR, "20kB")  # 30 x 102 flattened dims x 4 B x 2 = 24,480 B
    calls: list = []
    with pytest.raises(budget.BudgetError) as info:
        calls = _fit_counting(net, KNN(k=2), (BLOCK2,), n=30)
    assert str(info.value) == (
        "KNN(k=2): the feature bank of 30 calibration samples x 102 dims (x2: features and "
        "index) needs ~2.4e-05 GB of memory but 2e-05 GB are available (OOD_LENS_MEMORY_LIMIT);"
        " use pooling='cls' or pooling='mean' (over tokens, fewer dims), smaller or fewer "
        "layers or fewer calibration samples."
    )
    assert calls == []
    with pytest.raises(budget.BudgetError, match=r"x 96 dims .* use pooling='mean' \(fewer"):
        _fit_counting(net, KNN(k=2), (EMBED,), n=30)  # (N, 6, 4, 4): a map
    _fit_counting(net, KNN(k=2, pooling="cls"), (BLOCK2,), n=30)  # 30 x 6 dims: fits


def test_timm_vit_block_tokens():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=16,
        patch_size=4,
        num_classes=3,
        depth=2,
        in_chans=1,
        pretrained=False,
    ).eval()
    cal, test = torch.rand(24, 1, 16, 16), torch.rand(5, 1, 16, 16)
    ev = Evaluation.for_net(vit, cal)
    block = next(lid for lid in ev.recorder.layer_ids if ev.recorder.layer_name(lid) == "blocks.1")
    assert tuple(ev.recorder.info(block).output_size) == (1, 17, 192)  # CLS + 16 patches
    got = {}
    handle = vit.blocks[1].register_forward_hook(lambda m, a, o: got.setdefault("a", o.detach()))
    with torch.no_grad():
        vit(test)
    handle.remove()
    for pooling, hand in (("cls", got["a"][:, 0]), ("mean", got["a"].mean(1))):
        knn = KNN(k=1, pooling=pooling, act_norm=None, index_metric="ip")
        knn.layers = (block,)
        assert knn.estimate_bytes(ev.recorder, 24) == 24 * 192 * 4 * 2  # was 24 x 3,264 dims
        ev.fit([knn], cal)
        ((_, conf),) = ev.confidences([knn], test)
        bank = torch.from_numpy(knn.index_.reconstruct_n(0, 24))
        want = (hand @ bank.T).max(1).values
        torch.testing.assert_close(conf[:, 0].float(), want, rtol=1e-5, atol=1e-5)
