"""Architectures of the bundled Fashion-MNIST classifiers.

Every net takes float images in [0, 1] of shape ``(N, 1, 28, 28)`` (it normalises internally with
fixed buffers, so no nn.Module is spent on it and the layer table starts at the first real layer)
and returns logits of shape ``(N, 10)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530


class _Normalised(nn.Module):
    """Base class: stores the input normalisation as buffers (not as a submodule)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(FMNIST_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(FMNIST_STD), persistent=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of an ``(N, C, H, W)`` tensor."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Block(nn.Module):
    """ConvNeXt-like block with an Inception-style depthwise token mixer and a gated MLP.

    Channels are split in four groups: identity, depthwise 3x3, depthwise 1x7 and depthwise 7x1.
    Then LayerNorm, a 1x1 conv to 2C channels gated as ``a * gelu(b)``, a 1x1 conv back to C, and a
    residual connection scaled by a learnt per-channel ``gamma``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        g = channels // 4
        self.split = (channels - 3 * g, g, g, g)
        self.gamma = nn.Parameter(torch.full((channels,), 0.1))
        self.dwconv1 = nn.Conv2d(g, g, 3, padding=1, groups=g)
        self.dwconv2 = nn.Conv2d(g, g, (1, 7), padding=(0, 3), groups=g)
        self.dwconv3 = nn.Conv2d(g, g, (7, 1), padding=(3, 0), groups=g)
        self.ln = LayerNorm2d(channels)
        self.fc1 = nn.Conv2d(channels, 2 * channels, 1)
        self.fc2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xi, x1, x2, x3 = torch.split(x, self.split, dim=1)
        y = torch.cat([xi, self.dwconv1(x1), self.dwconv2(x2), self.dwconv3(x3)], dim=1)
        a, b = self.fc1(self.ln(y)).chunk(2, dim=1)
        y = self.fc2(a * F.gelu(b))
        return x + self.gamma[None, :, None, None] * y


class Tiniest(_Normalised):
    """ConvNeXt-like net (~100k parameters) in the spirit of the reference library's ``tiniest``.

    conv stem (3x3, stride 2) -> LayerNorm2d -> 3 Blocks(48) -> 1x1 stride-2 conv -> LayerNorm2d
    -> 3 Blocks(80) -> adaptive average pool -> linear head.
    """

    def __init__(self, num_classes: int = 10, c1: int = 48, c2: int = 80) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, stride=2, padding=1)
        self.ln1 = LayerNorm2d(c1)
        self.l1, self.l2, self.l3 = Block(c1), Block(c1), Block(c1)
        self.dsconv = nn.Conv2d(c1, c2, 1, stride=2)
        self.ln2 = LayerNorm2d(c2)
        self.l4, self.l5, self.l6 = Block(c2), Block(c2), Block(c2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(self.conv1(self.normalise(x)))
        x = self.l3(self.l2(self.l1(x)))
        x = self.ln2(self.dsconv(x))
        x = self.l6(self.l5(self.l4(x)))
        return self.fc(self.avgpool(x).flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, ReLU, identity or 1x1 projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNetSmall(_Normalised):
    """A small ResNet (~80k parameters): stem 3x3 conv, three stages of one BasicBlock each
    (16 ch at 28x28, 32 ch at 14x14, 64 ch at 7x7), global average pool, linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.layer3 = BasicBlock(32, 64, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(self.normalise(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


ARCHITECTURES: dict[str, type[nn.Module]] = {"tiniest": Tiniest, "resnet_small": ResNetSmall}
