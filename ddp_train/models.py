"""Model registry: the seeds' MLP and CNNs, and torchvision ResNet/EfficientNet adapted to the data's
channels and classes. Pretrained weights only from a local file (no hub download at run time)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .data.types import DataInfo
from .errors import ConfigError, did_you_mean

BUILDERS: dict[str, Callable[[ModelConfig, DataInfo], nn.Module]] = {}


def register(*names: str):
    def deco(fn):
        for n in names:
            BUILDERS[n] = fn
        return fn
    return deco


def build_model(cfg: ModelConfig, info: DataInfo) -> nn.Module:
    if cfg.name not in BUILDERS:
        raise ConfigError(f"unknown model 'model.name={cfg.name}'" + did_you_mean(cfg.name, list(BUILDERS)))
    model = BUILDERS[cfg.name](cfg, info)
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    return model


@register("mlp")
def mlp(cfg: ModelConfig, info: DataInfo) -> nn.Module:
    h, w = info.image_size
    return nn.Sequential(nn.Flatten(), nn.Linear(info.in_channels * h * w, 512), nn.ReLU(),
                         nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, info.num_classes))


class SeedCNN(nn.Module):
    """conv 1->32, pool, conv 32->64, pool, fc 3136->128, dropout, fc 128->10 (for 28x28 digits)."""

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int], dropout: float):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        flat = 64 * (image_size[0] // 4) * (image_size[1] // 4)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Dropout(dropout),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register("cnn")
def cnn(cfg: ModelConfig, info: DataInfo) -> nn.Module:
    return SeedCNN(info.in_channels, info.num_classes, info.image_size, dropout=0.0)


@register("cnn_dropout")
def cnn_dropout(cfg: ModelConfig, info: DataInfo) -> nn.Module:
    return SeedCNN(info.in_channels, info.num_classes, info.image_size, dropout=cfg.dropout)


@register("resnet18", "resnet34", "resnet50")
def resnet(cfg: ModelConfig, info: DataInfo) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, cfg.name)(weights=None, num_classes=info.num_classes)
    if info.in_channels != 3:
        model.conv1 = nn.Conv2d(info.in_channels, 64, 7, 2, 3, bias=False)
    return model


@register(*(f"efficientnet_b{i}" for i in range(4)))
def efficientnet(cfg: ModelConfig, info: DataInfo) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, cfg.name)(weights=None, num_classes=info.num_classes,
                                                 dropout=cfg.dropout)
    if info.in_channels != 3:
        stem = model.features[0][0]
        model.features[0][0] = nn.Conv2d(info.in_channels, stem.out_channels, stem.kernel_size, stem.stride,
                                         stem.padding, bias=False)
    return model


def load_pretrained(model: nn.Module, path: str) -> None:
    """Weights from a local state_dict file; a classifier whose shape differs (other classes) is skipped."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.pretrained: no file at {p}; weights are never downloaded at run time: "
                          "download them once (e.g. torchvision's URL) and give the local path")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"model.pretrained: {p} is not a loadable state_dict ({type(e).__name__})") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in kept]
    unexpected = [k for k in state if k not in own]
    if unexpected or len(missing) > 4:  # more than a classifier/stem: the wrong architecture
        raise ConfigError(f"model.pretrained: {p} does not fit {type(model).__name__}: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(kept, strict=False)
