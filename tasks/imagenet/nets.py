"""The torch modules of the imagenet family (imported only when a model is built: `bench ls` and suite
validation stay free of torch). Module-level classes, so models pickle into checkpoints and into the
isolated measuring processes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ImageClassifier(nn.Module):
    """A classifier and its preprocessing: pixels in [0, 1] -> logits.

    ``data_config`` is the model's timm data config (input_size, interpolation, crop_pct, crop_mode, mean,
    std). The resize and crop are applied by the data pipeline (`data.eval_transform`); normalisation
    happens here. Inputs whose side differs from the model's input size are resized to it (bicubic,
    antialiased), so a teacher at 240 px and a student at 224 px can share one training batch.
    """

    def __init__(self, net: nn.Module, data_config: dict[str, Any], name: str) -> None:
        super().__init__()
        self.net = net
        self.name = name
        self.data_config = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in data_config.items()}
        self.register_buffer("mean", torch.tensor(self.data_config["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.data_config["std"], dtype=torch.float32).view(1, 3, 1, 1))

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.data_config["input_size"][1:])

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != self.input_size:
            pixels = F.interpolate(pixels, size=self.input_size, mode="bicubic", align_corners=False,
                                   antialias=True).clamp(0, 1)
        return (pixels - self.mean) / self.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(pixels))


class BasicBlock(nn.Module):
    """He et al. 2016's basic block; a 1x1 projection shortcut where the shape changes (option B)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. 2016, section 4.2: ``depth = 6n + 2`` layers, stages of 16/32/64 x ``width`` channels."""

    def __init__(self, depth: int, width: int, num_classes: int) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16 * width, 3, 1, 1, bias=False), nn.BatchNorm2d(16 * width), nn.ReLU())
        blocks, cin = [], 16 * width
        for stage, cout in enumerate((16 * width, 32 * width, 64 * width)):
            for b in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (b == 0 and stage > 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():  # He et al. 2015 initialisation, as the CIFAR ResNet recipes use
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))
