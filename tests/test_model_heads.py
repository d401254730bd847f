"""Head rules that check themselves: the head is the last Linear whose output *is* the network's
output (checked on the traced example), so a score that recomputes logits from a head never runs
on a head whose logits the network does not return; RankFeat refuses a 1x1 map."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ood_core import eval as ev
from ood_core.recorder import Recorder
from ood_core.scores import ASH, DICE, SCALE, RankFeat, ReAct, ViM, fDBD


class TwoHeads(nn.Module):
    """DeiT-distilled's shape: output = mean of two Linear heads over one feature."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)
        self.head_dist = nn.Linear(8, 3)

    def forward(self, x):
        h = self.body(x)
        return (self.head(h) + self.head_dist(h)) / 2


class ScaledHead(nn.Module):
    """A Linear head whose logits the network changes afterwards (temperature in forward)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.body(x)) / 3.0


class Plain(ScaledHead):
    def forward(self, x):
        return self.fc(self.body(x))


X = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make", [TwoHeads, ScaledHead])
def test_a_head_whose_logits_are_not_the_output_is_no_head(make):
    rec = Recorder(make().eval(), input_data=X[:1])
    assert rec.head() is None
    assert rec.quick_picks()["logits"] == []


def test_the_head_of_a_plain_classifier_is_found_and_checked():
    rec = Recorder(Plain().eval(), input_data=X[:1])
    assert rec.head() == (1, 2)
    assert rec.quick_picks()["logits"] == [(1, 2)]


HEAD_SCORES = {
    "ViM @ head_dist": (lambda: ViM(), [(1, 3)], r"ViM @ 1-3: .*not the network's output"),
    "ViM @ head": (lambda: ViM(), [(1, 2)], r"ViM @ 1-2: .*not the network's output"),
    "ReAct": (lambda: ReAct(), [(2, 3)], r"ReAct .*no nn.Linear layer producing its output"),
    "ASH": (lambda: ASH(), [(2, 3)], r"ASH .*no nn.Linear layer producing its output"),
    "SCALE": (lambda: SCALE(), [(2, 3)], r"SCALE .*no nn.Linear layer producing its output"),
    "DICE": (lambda: DICE(), [(2, 3)], r"DICE .*no nn.Linear layer producing its output"),
    "fDBD": (lambda: fDBD(), [(2, 3)], r"fDBD .*no nn.Linear layer producing its output"),
}


@pytest.mark.parametrize("row", list(HEAD_SCORES))
def test_head_scores_refuse_a_two_head_network_before_any_work(row):
    make, layers, message = HEAD_SCORES[row]
    net = TwoHeads().eval()
    calls = []
    net.body.register_forward_hook(lambda *a: calls.append(1))
    rec = Recorder(net, input_data=X[:1])
    n_trace = len(calls)
    with pytest.raises(ValueError, match=message):
        ev.fit_scores([(make(), layers)], rec, X, progress=False)
    assert len(calls) == n_trace  # refused with no forward pass (the head is checked on the trace)


def test_vim_on_the_checked_head_still_runs():
    net = Plain().eval()
    fitted = ev.fit_scores([(ViM(dim=2), [(1, 2)])], net, X, progress=False)
    confs, _ = ev.compute_confidence(fitted, X, progress=False)
    assert confs.shape == (1, len(X)) and torch.isfinite(confs).all()


class OneByOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.block(self.pool(self.conv(x))).flatten(1))


def test_rankfeat_refuses_a_1x1_map_naming_the_layer():
    net = OneByOne().eval()
    with pytest.raises(ValueError, match=r"RankFeat @ 1-3 \(block\): the feature map .* is 1x1"):
        ev.fit_scores([(RankFeat(), [(1, 3)])], net, X, progress=False)
    fitted = ev.fit_scores([(RankFeat(), [(1, 1)])], net, X, progress=False)  # 4x4: fine
    confs, _ = ev.compute_confidence(fitted, X, progress=False)
    assert confs.std() > 0
