"""Recorder: torchinfo (depth, idx) ids, hooks, activations, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ood_core.recorder import Recorder


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.lin(x))


class Net(nn.Module):
    """a -> block(lin, act) -> shared -> shared (called twice) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.block = Inner()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.block(self.a(x))
        x = self.shared(self.shared(x))
        return self.head(x)


@pytest.fixture()
def net():
    torch.manual_seed(0)
    return Net().eval()


def test_ids_follow_torchinfo_depth_index(net):
    rec = Recorder(net, input_data=torch.rand(1, 3))
    table = rec.layer_table()
    # Checked by hand: depth_index counts calls per depth across the whole net, in call order.
    expected = [
        ("0-1", "(network)", "Net"),
        ("1-1", "a", "Linear"),
        ("1-2", "block", "Inner"),
        ("2-1", "block.lin", "Linear"),
        ("2-2", "block.act", "ReLU"),
        ("1-3", "shared", "Linear"),
        ("1-4", "shared", "Linear"),
        ("1-5", "head", "Linear"),
    ]
    assert list(zip(table["id"], table["name"], table["type"], strict=True)) == expected
    assert table.loc[table["id"] == "1-1", "params"].item() == 3 * 4 + 4
    assert table.loc[table["id"] == "0-1", "params"].item() == 16 + 20 + 20 + 10
    assert table["output_shape"].tolist()[-1] == "[1, 2]"


def test_activations_equal_module_outputs(net):
    rec = Recorder(net, input_data=torch.rand(1, 3))
    rec.record((1, 3), (1, 4), (2, 1), (0, 1), "1-5")
    x = torch.rand(5, 3)
    logits = rec(x)
    h = net.block(net.a(x))
    acts = rec.activations
    torch.testing.assert_close(acts[(2, 1)], net.block.lin(net.a(x)))
    torch.testing.assert_close(acts[(1, 3)], net.shared(h))  # first call of `shared`
    torch.testing.assert_close(acts[(1, 4)], net.shared(net.shared(h)))  # second call
    torch.testing.assert_close(acts[(1, 5)], logits)
    torch.testing.assert_close(acts[(0, 1)], logits)
    # As the reference library: duplicates and the order given are ignored (table/call order).
    assert rec.recording == tuple(
        lid for lid in rec.layer_ids if lid in {(1, 3), (1, 4), (2, 1), (0, 1), (1, 5)}
    )
    assert rec.recording[0] == (0, 1) and rec.recording.index((2, 1)) < rec.recording.index((1, 3))


def test_calls_through_the_recorder_reset_and_direct_net_calls_touch_nothing(net):
    rec = Recorder(net, input_data=torch.rand(1, 3))
    rec.record((1, 4))
    x1, x2 = torch.rand(2, 3), torch.rand(2, 3)
    rec(x1)
    rec(x2)  # counters reset per forward: (1, 4) is still the second call of `shared`
    expected = net.shared(net.shared(net.block(net.a(x2))))
    torch.testing.assert_close(rec.activations[(1, 4)], expected)
    net(x1)  # the network alone carries no hook of the recorder: nothing is recorded
    torch.testing.assert_close(rec.activations[(1, 4)], expected)


def test_unknown_layer_id_is_a_clear_error(net):
    rec = Recorder(net, input_data=torch.rand(1, 3))
    with pytest.raises(ValueError, match=r"Unknown layer id 1-9 .*depth 1: 1-1 to 1-5"):
        rec.record((1, 9))
    with pytest.raises(ValueError, match=r"\(depth, index\) pair"):
        rec.record("banana")


def test_layer_not_reached_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else self.b(x)

    net = Branchy()
    rec = Recorder(net, input_data=torch.ones(1, 2))
    rec.record((1, 1))
    with pytest.raises(RuntimeError, match=r"1-1 were not reached"):
        rec(-torch.ones(1, 2))


def test_the_network_carries_no_hook_or_attribute_between_passes(net):
    before = set(net.__dict__)
    rec = Recorder(net, input_data=torch.rand(1, 3))
    rec.record((1, 1), (1, 3), (0, 1))
    seen = []
    net.a.register_forward_hook(lambda m, i, o: seen.append(len(net.a._forward_hooks)))
    rec(torch.rand(2, 3))
    assert seen == [2]  # the recorder's hook exists only while its pass runs
    modules = [net, *net.modules()]
    assert sum(len(m._forward_hooks) for m in modules) == 1  # the test's own hook only
    assert not any(m._forward_pre_hooks for m in modules)
    assert set(net.__dict__) == before


def test_wrong_input_shape_names_the_shape(net):
    with pytest.raises(ValueError, match=r"example input of shape \(1, 7\)"):
        Recorder(net, input_data=torch.rand(1, 7))


def test_record_batches_reduces_per_batch_with_progress(net):
    rec = Recorder(net, input_data=torch.rand(1, 3)).record((1, 2))
    x = torch.rand(10, 3)
    seen = []
    out = rec.record_batches(
        x,
        batch_size=4,
        reduce=lambda lg, acts: acts[(1, 2)].sum(1),
        progress=lambda d, t: seen.append((d, t)),
    )
    assert seen == [(4, 10), (8, 10), (10, 10)]
    torch.testing.assert_close(torch.cat(out), net.block(net.a(x)).sum(1))


def test_repr_shows_table_and_recording(net):
    rec = Recorder(net, input_data=torch.rand(1, 3)).record((1, 1))
    text = repr(rec)
    assert "Linear (a): 1-1" in text and "Currently recording: 1-1" in text


def test_tiniest_layer_table_resembles_the_seed(tiniest):
    rec = Recorder(tiniest, input_data=torch.rand(1, 1, 28, 28))
    table = rec.layer_table().set_index("id")
    assert table.loc["1-5", "name"] == "l3" and table.loc["1-5", "type"] == "Block"
    assert table.loc["1-11", "type"] == "AdaptiveAvgPool2d"
    assert table.loc["1-12", "type"] == "Linear" and table.loc["1-12", "output_shape"] == "[1, 10]"
    assert table.loc["2-38", "name"] == "l6.fc2"
    assert 80_000 < table.loc["0-1", "params"] < 120_000


def test_quick_picks_on_tiniest(tiniest):
    picks = Recorder(tiniest, input_data=torch.rand(1, 1, 28, 28)).quick_picks()
    assert picks["logits"] == [(1, 12)] and picks["penultimate"] == [(1, 11)]
    assert picks["blocks"] == [(1, 3), (1, 4), (1, 5), (1, 8), (1, 9), (1, 10)]
