"""Cost of exact recording (prints figures): a Recorder's pass against the plain forward pass.

A Recorder installs its hooks only during its own pass, under the model's lock, copies the input
batch (a network editing its input in place never changes the caller's tensors) and copies a
recorded output only when the network later writes into it in place (detected by the tensor's
version counter; that first pass is rerun once). Run alone:
``.venv/bin/python benchmarks/bench_recording.py``
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from ood_core.hub import load_model
from ood_core.recorder import Recorder


def _seconds(f: Callable[[], object], n: int = 20) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n


class ConvBnRelu(nn.Module):
    """conv -> BatchNorm -> ReLU(inplace=True) (torchvision's ResNet stem) -> mean -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.bn = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.bn(self.conv(x))).mean((2, 3)))


def main() -> None:
    torch.set_num_threads(2)
    cases = [
        (
            "tiniest, 512 x 1x28x28, records 1-5, 1-11",
            load_model("bundled", "tiniest"),
            torch.rand(512, 1, 28, 28),
            [(1, 5), (1, 11)],
        ),
        (
            "conv-bn-relu(inplace), 256 x 3x32x32, records the BN (1-2)",
            ConvBnRelu().eval(),
            torch.rand(256, 3, 32, 32),
            [(1, 2)],
        ),
    ]
    for title, net, x, layers in cases:
        rec = Recorder(net, input_data=x[:1]).record(*layers)
        with torch.no_grad():
            recorded = _seconds(lambda rec=rec, x=x: rec(x))
            plain = _seconds(lambda net=net, x=x: net(x))
        print(
            f"{title}: recorder {1e3 * recorded:.1f} ms, plain {1e3 * plain:.1f} ms "
            f"(+{100 * (recorded - plain) / plain:.1f} %); copied layers: "
            f"{list(rec.copied_layers) or 'none'}"
        )


if __name__ == "__main__":
    main()
