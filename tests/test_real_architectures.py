"""Real architectures nobody here wrote, randomly initialised (no weights can be downloaded):
torchvision ``resnet18``, timm ``convnext_atto``, a timm ViT (32 px, patch 4) and timm's
two-head DeiT-distilled. Every score either runs (in-place operations change nothing; numbers
equal hooks on a copy without in-place operations) or refuses before any forward pass, naming
the layer and the fix; no score runs on a head that does not produce the network's output.

torchvision and timm are part of the set-up (``pyproject.toml``'s dev extra, torch and
torchvision pinned in ``constraints.txt``): a missing one fails here, it is not skipped."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ood_core import eval as ev
from ood_core.data import load_bundled
from ood_core.layer_ids import layer_text
from ood_core.recorder import Recorder
from ood_core.scores import SCORES, BaseScore

N_CALIB, N_TEST = 96, 48


def _rgb32(images: torch.Tensor) -> torch.Tensor:
    """Bundled 1x28x28 images as 3x32x32 in [0, 1] (what these architectures take here)."""
    return F.interpolate(images, size=32, mode="bilinear").clamp(0, 1).repeat(1, 3, 1, 1)


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    calib = load_bundled("fashion_mnist", "calibration")
    return {
        "calib": _rgb32(calib.images[:N_CALIB]),
        "labels": calib.labels[:N_CALIB],
        "test": _rgb32(load_bundled("fashion_mnist", "test").images[:N_TEST]),
        "ood": _rgb32(load_bundled("mnist", "test").images[:N_TEST]),
    }


def _not_in_place(net: nn.Module) -> nn.Module:
    """A copy with every ``inplace=True`` switched off (the same weights)."""
    other = copy.deepcopy(net)
    for module in other.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return other


def make(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "resnet18":
        net = torchvision.models.resnet18(num_classes=10)
    elif arch == "convnext_atto":
        net = timm.create_model("convnext_atto", num_classes=10, pretrained=False)
    elif arch == "vit":
        net = timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, num_classes=10
        )
    else:  # output = mean of two Linear heads (the class token's and the distillation token's)
        net = timm.create_model(
            "deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, depth=4, num_classes=10
        )
    return net.eval()


ARCHS = ("resnet18", "convnext_atto", "vit", "deit_distilled")

SMALL = {"Odds": {"noise_samples": 8}}
"""Parameters that only make a score quicker here (Odds' 256 noisy copies per sample)."""


def score(name: str, recorder: Recorder | None = None) -> BaseScore:
    """Score ``name`` with its defaults; with a recorder whose default layers for it are token
    outputs ``(N, L, D)``, with ``pooling='cls'`` where it has a pooling (what its warnings
    advise: flattened, a ViT block is 12,480 dims and a covariance of them takes minutes)."""
    cls = SCORES.get_class(name)
    params = {p.name: p.default for p in cls.all_params() if p.required} | SMALL.get(name, {})
    if recorder is not None and any(p.name == "pooling" for p in cls.all_params()):
        sizes = [recorder.info(lid).output_size for lid in cls.default_layers(recorder)]
        if any(len(size) == 3 for size in sizes):  # noqa: PLR2004
            params["pooling"] = "cls"
    return cls(**params)


HEAD_SCORES = ("ViM", "ReAct", "ASH", "SCALE", "DICE", "fDBD")

REFUSED = {
    # the two heads' mean is the output: no Linear produces it, so no head-based score runs
    ("deit_distilled", name): r"not the network's output|no nn\.Linear layer producing its output"
    for name in HEAD_SCORES
}
"""(architecture, score) pairs refused at their default layers, with the message expected."""


class Calls:
    """Counts the forward passes of a network (a test-owned hook)."""

    def __init__(self, net: nn.Module) -> None:
        self.n = 0
        self.handle = net.register_forward_pre_hook(self)

    def __call__(self, *args: object) -> None:
        self.n += 1


@pytest.fixture(scope="module", params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def recorded(arch, images) -> tuple[nn.Module, Recorder]:
    net = make(arch)
    return net, Recorder(net, input_data=images["calib"][:1])


def test_quick_picks_name_the_layers_a_user_means(recorded, arch):
    """The head is checked, the penultimate pick is what feeds it (ViT's pooled fc_norm, an
    Identity; ConvNeXt's head.norm) and the blocks are one per stage."""
    _, rec = recorded
    picks = {k: [rec.layer_name(lid) for lid in v] for k, v in rec.quick_picks().items()}
    expected = {
        "resnet18": ("fc", "avgpool", ["layer1", "layer2", "layer3", "layer4"]),
        "convnext_atto": ("head.fc", "head.norm", [f"stages.{i}" for i in range(4)]),
        "vit": ("head", "fc_norm", [f"blocks.{i}" for i in range(4)]),
        "deit_distilled": (None, None, [f"blocks.{i}" for i in range(4)]),
    }[arch]
    assert picks["logits"] == ([expected[0]] if expected[0] else [])
    assert picks["penultimate"] == ([expected[1]] if expected[1] else [])
    assert picks["blocks"] == expected[2]


def test_default_layers_are_layers_the_score_accepts(recorded):
    _, rec = recorded
    for name, cls in SCORES.items():
        if cls.layer_rule == "none":
            continue
        allowed = cls.allowed_layers(rec)
        defaults = cls.default_layers(rec)
        assert set(defaults) <= set(allowed), name
        assert defaults or not allowed, f"{name}: no default although {allowed} are accepted"


def test_every_score_runs_or_refuses_before_any_forward_pass(recorded, arch, images):
    net, rec = recorded
    calls = Calls(net)
    try:
        runs = []
        for name in SCORES:
            s = score(name, rec)
            layers = type(s).default_layers(rec)
            expected = REFUSED.get((arch, name))
            if expected is None and s.layer_rule != "none" and not layers:
                pytest.fail(f"{arch}: {name} has no default layer and is not expected to refuse")
            if expected is not None:
                before = calls.n
                with pytest.raises(ValueError, match=expected):
                    ev.fit_scores([(s, layers)], rec, images["calib"], progress=False)
                assert calls.n == before, f"{name} ran a forward pass before refusing"
                continue
            runs.append((s, layers))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fitted = ev.fit_scores(runs, rec, images["calib"], images["labels"], progress=False)
            ind, (ood,) = ev.compute_confidence(
                fitted, images["test"], [images["ood"]], progress=False
            )
    finally:
        calls.handle.remove()
    assert ind.shape == (len(runs), N_TEST) and ood.shape == (len(runs), N_TEST)
    said = " ".join(str(w.message) for w in caught)
    for i, (s, layers) in enumerate(runs):
        both = torch.cat([ind[i], ood[i]])
        name = type(s).__name__
        if bool(torch.isfinite(both).all()) and float(both.std()) > 0:
            continue  # numbers that can rank samples
        # anything else must have been said, naming the score (degenerate fits warn)
        assert re.search(rf"\b{name}\b", said), f"{arch}: {name} @ {layers} is degenerate unsaid"


def test_head_scores_refuse_either_head_of_the_two_head_deit(images):
    net = make("deit_distilled")
    rec = Recorder(net, input_data=images["calib"][:1])
    assert rec.head() is None and rec.quick_picks()["logits"] == []
    heads = [lid for lid in rec.layer_ids if rec.layer_name(lid) in ("head", "head_dist")]
    assert len(heads) == 2
    for name in HEAD_SCORES:
        for lid in heads:
            with pytest.raises(ValueError, match=rf"{name}.*{layer_text(lid)}|{name} .*Linear"):
                ev.fit_scores([(score(name), [lid])], rec, images["calib"], progress=False)


# ---------------------------------------------------------------------------- in-place operations
BN1 = (1, 2)
"""torchvision ResNet's ``bn1``: its output is rewritten by ``relu`` (``inplace=True``)."""


def test_recorded_activations_equal_hooks_on_a_copy_without_in_place_ops(images):
    net = make("resnet18")
    plain = _not_in_place(net)
    x = images["calib"][:8]
    seen = {}
    handle = plain.bn1.register_forward_hook(lambda m, a, out: seen.setdefault("bn1", out.clone()))
    with torch.no_grad():
        plain(x)
    handle.remove()
    rec = Recorder(net, input_data=x[:1]).record(BN1, (1, 5))
    with torch.no_grad():
        rec(x)
    assert rec.layer_name(BN1) == "bn1"
    torch.testing.assert_close(rec.activations[BN1], seen["bn1"], rtol=0, atol=0)
    assert float(rec.activations[BN1].min()) < 0  # before the ReLU, not after it
    assert BN1 in rec.copied_layers


def test_every_score_gives_the_same_confidences_with_and_without_in_place_ops(images):
    """The issue's case: KNN @ bn1 differed by up to 0.264 between inplace=True and False."""
    nets = {"in place": make("resnet18")}
    nets["not in place"] = _not_in_place(nets["in place"])
    extra = [("KNN", [BN1]), ("DeepMahalanobis", [BN1]), ("Gram", [BN1, (1, 5)])]
    params = {"KNN": {"k": 15}, "DeepMahalanobis": {"pooling": "mean"}}  # bn1: 16,384 dims
    confidences = {}
    for key, net in nets.items():
        rec = Recorder(net, input_data=images["calib"][:1])
        pairs = [(score(n), type(score(n)).default_layers(rec)) for n in SCORES]
        pairs += [(type(score(n))(**params.get(n, {})), layers) for n, layers in extra]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # degenerate fits warn alike on both
            fitted = ev.fit_scores(pairs, rec, images["calib"], images["labels"], progress=False)
            ind, (ood,) = ev.compute_confidence(
                fitted, images["test"], [images["ood"]], progress=False
            )
        confidences[key] = torch.cat([ind, ood], 1)
    a, b = confidences.values()
    both_finite = torch.isfinite(a) & torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    torch.testing.assert_close(a[both_finite], b[both_finite], rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------- the CLI, a hub folder
HUBCONF = '''\
dependencies = ["torch", "torchvision"]

import torch
import torchvision


def resnet18_gray(num_classes: int = 10):
    """torchvision's ResNet-18 for 1-channel 28x28 images, randomly initialised."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=num_classes)
    net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net
'''


def test_the_cli_runs_a_torchvision_model_from_a_local_hub_folder(tmp_path, capsys):
    """README's "Your own model" example: a hub folder importing torchvision, run by the CLI."""
    import pandas as pd

    from ood_core.cli import main

    hub = tmp_path / "my_hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text(HUBCONF)
    config = tmp_path / "run.toml"
    config.write_text(
        f'[model]\nrepo = "{hub}"\nentry = "resnet18_gray"\n\n'
        '[data]\nind_dataset = "fashion_mnist"\nn_calibration = 200\nn_test = 100\n\n'
        '[[scores]]\nname = "Energy"\n\n'
        '[[scores]]\nname = "KNN"\nlayers = ["1-9"]\nparams = {k = 10}\n\n'  # avgpool: the head's input
        '[[scores]]\nname = "DeepMahalanobis"\nlayers = ["1-2"]\nparams = {pooling = "mean"}\n\n'
        '[[scenarios]]\ndataset = "mnist"\n'
    )
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out), "--quiet", "--trust-repo"]) == 0
    capsys.readouterr()
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["score"].unique()) == [
        "Energy()",
        "KNN(k=10)",
        "DeepMahalanobis(pooling='mean')",
    ]
    assert set(metrics["layers"].astype(str).unique()) >= {"1-9", "1-2"}
    assert metrics["value"].between(0, 1).all()
