"""What a dataset hands the engine: the splits and the facts the model and tools need (classes,
channels, size, normalisation); how a job obtains it (Source); the normalisation constants and the
evaluation resize rule."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..config import DataConfig

MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_STATS = ((0.2860,), (0.3530,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class ImageTensors:
    """A whole split in memory: images uint8 [N, C, H, W], labels int64 [N]."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DataInfo:
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] = field(default_factory=list)
    flips: bool = False  # horizontal flips preserve the label (not for digits)


@dataclass
class Splits:
    train: ImageTensors | torch.utils.data.Dataset
    test: ImageTensors | torch.utils.data.Dataset
    info: DataInfo

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, ImageTensors) and isinstance(self.test, ImageTensors)


@dataclass(frozen=True)
class Source:
    """How a dataset comes into a job. `prepare` runs on global rank 0 alone (download, folder scan) and
    returns a picklable result every rank receives; `open` runs on every rank with it (reads files, builds
    transforms). `downloads`: prepare fetches files, so each other node's local rank 0 repeats it after rank
    0 (a no-op where rank 0's files are visible; a node-local data.root gets its own copy, never two
    downloads into one directory at once)."""
    open: Callable[[DataConfig, Any], Splits]
    prepare: Callable[[DataConfig], Any] | None = None
    downloads: bool = False


def eval_resize(image_size: int, resize_size: int | None) -> int:
    """The evaluation Resize before CenterCrop(image_size): ImageNet's 256/224 ratio unless set."""
    return resize_size or round(image_size * 256 / 224)
