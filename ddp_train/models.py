"""Models: the seeds' MLP and CNNs and torchvision ResNet/EfficientNet (a registry), any timm
architecture (`timm/<name>`), or the user's own factory (`pkg.module:factory`), all sized to the data's
classes and channels. Pretrained weights only from a local file (no hub download at run time)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .data.types import DataInfo
from .errors import ConfigError, did_you_mean
from .usercode import call, is_import_path, resolve

BUILDERS: dict[str, Callable[[ModelConfig, DataInfo], nn.Module]] = {}


def register(*names: str):
    def deco(fn):
        for n in names:
            BUILDERS[n] = fn
        return fn
    return deco


def build_model(cfg: ModelConfig, info: DataInfo, factory=None) -> nn.Module:
    """`factory`: a callable the Python API was given instead of model.name."""
    if factory is not None or is_import_path(cfg.name):
        model = user_model(cfg, info, factory)
    elif cfg.name.startswith("timm/"):
        model = timm_model(cfg, info)
    elif cfg.name not in BUILDERS:
        raise ConfigError(f"unknown model 'model.name={cfg.name}'" + did_you_mean(cfg.name, list(BUILDERS))
                          + " (or timm/<architecture>, or package.module:factory for your own)")
    elif cfg.kwargs:
        raise ConfigError(f"model.kwargs={cfg.kwargs} is for timm/ and package.module:factory models; "
                          f"'{cfg.name}' takes none (its options are model.dropout and model.pretrained)")
    else:
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


def image_size_arg(info: DataInfo) -> int | tuple[int, int]:
    h, w = info.image_size
    return h if h == w else (h, w)


def user_model(cfg: ModelConfig, info: DataInfo, factory=None) -> nn.Module:
    """factory(num_classes=C, in_channels=K, image_size=S, **model.kwargs); S is an int for square images,
    else (height, width)."""
    where = cfg.name if factory is None else getattr(factory, "__qualname__", "the model factory")
    fn = factory if factory is not None else resolve(cfg.name, "model.name")
    model = call(fn, where, "model.name", num_classes=info.num_classes, in_channels=info.in_channels,
                 image_size=image_size_arg(info), **cfg.kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name={where} returned {type(model).__name__}, not a torch.nn.Module: the factory "
                          "must return the model")
    return model


def timm_model(cfg: ModelConfig, info: DataInfo) -> nn.Module:
    """Any timm architecture, with its classifier and stem sized to the data; never downloads weights."""
    arch = cfg.name.removeprefix("timm/")
    try:
        import timm
    except ImportError:
        raise ConfigError(f"model.name={cfg.name} needs timm: pip install 'ddp_train[timm]' (or pip install timm)") from None
    if not timm.is_model(arch):
        close = [n for n in _closest(arch, timm.list_models())]
        hint = f"; closest: {', '.join('timm/' + n for n in close)}" if close else ""
        raise ConfigError(f"model.name={cfg.name}: timm has no architecture {arch!r}{hint}")
    kwargs = dict(cfg.kwargs)
    return call(timm.create_model, cfg.name, "model.name", model_name=arch, pretrained=False,
                num_classes=info.num_classes, in_chans=info.in_channels, **kwargs)


def _closest(name: str, names: list[str]) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, names, n=3, cutoff=0.5)


def load_pretrained(model: nn.Module, path: str) -> None:
    """Weights from a local state_dict (.pt/.pth) or .safetensors file; a classifier whose shape differs
    (other classes) is skipped."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.pretrained: no file at {p}; weights are never downloaded at run time: "
                          "download them once (e.g. torchvision's URL) and give the local path")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
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
