"""The model.name factory: a small CNN sized by ddp_train to the data (classes, channels, image size)."""
from __future__ import annotations

from torch import nn


def tiny_cnn(num_classes: int, in_channels: int, image_size: int, width: int = 16, depth: int = 2) -> nn.Module:
    layers, channels = [], in_channels
    for i in range(depth):
        layers += [nn.Conv2d(channels, width * 2 ** i, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width * 2 ** i
    side = image_size // 2 ** depth
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * side * side, num_classes))
