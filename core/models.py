"""Architecture registry: every model the product ships is a builder registered under a name.

Callers (checkpoint loader, CLI, sidebar) only know names, as in timm's `create_model`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, ...]  # one sample, without the batch dimension
    task: str  # "multiclass" (argmax) or "binary" (one logit, threshold 0)
    summary: str


REGISTRY: dict[str, ArchSpec] = {}


def register(name: str, input_shape: tuple[int, ...], task: str, summary: str):
    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        REGISTRY[name] = ArchSpec(name, builder, input_shape, task, summary)
        return builder

    return wrap


def build(arch: str, **kwargs) -> nn.Module:
    if arch not in REGISTRY:
        raise KeyError(f"Unknown architecture '{arch}'. Registered: {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[arch].builder(**kwargs)


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=True),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=False),
    )


class SmallVGG(nn.Module):
    """Plain VGG-style CNN for 28x28 grey images: nothing bypasses the last conv (512 ch at 3x3)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 512):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, 32), nn.MaxPool2d(2),   # 28 -> 14
            conv_bn_relu(32, 64), nn.MaxPool2d(2),            # 14 -> 7
            conv_bn_relu(64, 128), nn.MaxPool2d(2),           # 7 -> 3
            conv_bn_relu(128, width),                         # the last conv
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class SmallResNet(nn.Module):
    """ResNet9-style CNN for 28x28 grey images: a shortcut goes around the block holding the last conv.

    Laid out like the CIFAR-10 "ResNet9" of seed 000 (prep, layers, res block added to its input),
    shrunk to train on two CPU cores.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 512, bottleneck: int = 128):
        super().__init__()
        self.prep = nn.Sequential(conv_bn_relu(in_channels, 32), nn.MaxPool2d(2))    # 28 -> 14
        self.layer1 = nn.Sequential(conv_bn_relu(32, 64), nn.MaxPool2d(2))          # 14 -> 7
        self.layer2 = nn.Sequential(conv_bn_relu(64, 128), nn.MaxPool2d(2))         # 7 -> 3
        self.layer3 = conv_bn_relu(128, width)
        self.res3 = nn.Sequential(conv_bn_relu(width, bottleneck), conv_bn_relu(bottleneck, width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        x = x + self.res3(x)
        return self.classifier(torch.flatten(self.pool(x), 1))


register("small_vgg", (1, 28, 28), "multiclass",
         "VGG-style: 4 conv+BN+ReLU, last conv 512 ch at 3x3, global average pool, linear")(SmallVGG)
register("small_resnet", (1, 28, 28), "multiclass",
         "ResNet9-style: 3 conv stages, conv to 512 ch, residual block (512->128->512) "
         "with a shortcut around it, global average pool, linear")(SmallResNet)
