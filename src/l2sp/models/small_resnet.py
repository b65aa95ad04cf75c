"""A small ResNet for the built-in 1×28×28 Fashion-MNIST benchmark (fast on one CPU core).

Stem: 3×3 conv, stride 2 (28→14), BatchNorm, ReLU. Then one stage per width, each of ``depth`` basic blocks
(two 3×3 convs with BatchNorm, identity or 1×1-conv shortcut); the first block of stage i has stride
``strides[i]`` (default 2, 2, 2: 14→7→4→2). Global average pooling and a linear classifier ``fc``.
Measured on one core of a shared 2-core CPU, batch 64, SGD step with channels_last: ≈ 10 ms with the
defaults (78k parameters); strides (1, 2, 2) ≈ 16 ms; widths 32/64/128 ≈ 20 ms (0.31M parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    """y = ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet for small grayscale images: ``stem``, ``stage1..stageN``, ``pool``, ``fc``."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64),
        depth: int = 1,
        strides: Sequence[int] = (2, 2, 2),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 2, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        c = widths[0]
        self.stage_names = []
        for i, w in enumerate(widths):
            blocks = [BasicBlock(c if j == 0 else w, w, strides[i] if j == 0 else 1) for j in range(depth)]
            setattr(self, f"stage{i + 1}", nn.Sequential(*blocks))
            self.stage_names.append(f"stage{i + 1}")
            c = w
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def block_names(self) -> list[str]:
        """The blocks freezing counts, input side first: the stem, then each stage."""
        return ["stem", *self.stage_names]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def small_resnet(
    num_classes: int = 10,
    in_channels: int = 1,
    widths: Sequence[int] = (16, 32, 64),
    depth: int = 1,
    strides: Sequence[int] = (2, 2, 2),
) -> SmallResNet:
    """The built-in benchmark's network (about 0.08M parameters with the defaults)."""
    if len(strides) != len(widths):
        from l2sp.errors import L2SPError

        raise L2SPError(
            f"small_resnet: {len(widths)} widths but {len(strides)} strides; give one stride per stage"
        )
    return SmallResNet(num_classes, in_channels, tuple(widths), depth, tuple(strides))
