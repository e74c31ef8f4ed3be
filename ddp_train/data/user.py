"""Users' own datasets: `data.name: pkg.module:factory`, called as factory(root=data.root, **data.kwargs)
and returning (train, test). Either map-style Datasets yielding (image tensor CxHxW, int label), which take
the DataLoader path (workers, pinned memory, per-sample keyed randomness, exact mid-epoch resume), or whole
splits in memory, which take the device-resident path: ddp_train.data.ImageTensors or a
torch.utils.data.TensorDataset of (uint8 images [N,C,H,W], int labels [N]).

Classes: data.num_classes, else len(train.classes), else the largest label + 1 (train.targets, or a scan).
Class names: train.classes when it is a list of names. Normalisation: a map-style dataset normalises its
own samples; give it `mean`/`std` attributes to let predict/export preprocess image files the same way.
In-memory uint8 splits are normalised by the engine with the training split's own mean and std."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from ..config import DataConfig
from ..errors import ConfigError, DataError
from ..usercode import call, resolve
from .types import DataInfo, ImageTensors, Source, Splits

log = logging.getLogger("ddp_train")
_made_on_this_rank: dict[str, Any] = {}  # rank 0's prepare() result, reused by its own open()


def user_source(cfg_name: str, factory=None):
    """A Source for an import path (or a factory object from the Python API)."""
    def make(cfg: DataConfig):
        fn = factory if factory is not None else resolve(cfg.name, "data.name")
        return call(fn, cfg.name, "data.name", root=cfg.root, **cfg.kwargs)

    def prepare(cfg: DataConfig) -> None:
        # rank 0 first (then each other node's local rank 0): a factory that downloads does it once
        _made_on_this_rank[cfg.name] = make(cfg)

    def open_(cfg: DataConfig, prepared=None) -> Splits:
        made = _made_on_this_rank.pop(cfg.name, None)
        return splits_from(made if made is not None else make(cfg), cfg)

    return Source(open=open_, prepare=prepare, downloads=True)


def object_source(train, test):
    """A Source for datasets handed to the Python API as objects."""
    return Source(open=lambda cfg, prepared=None: splits_from((train, test), cfg))


def splits_from(made: Any, cfg: DataConfig) -> Splits:
    where = f"data.name={cfg.name}"
    if not (isinstance(made, (tuple, list)) and len(made) == 2):
        raise ConfigError(f"{where} returned {type(made).__name__}; it must return (train, test) datasets")
    train, test = (_in_memory(part) or part for part in made)
    for split, name in ((train, "train"), (test, "test")):
        if not isinstance(split, (Dataset, ImageTensors)) and not hasattr(split, "__getitem__"):
            raise ConfigError(f"{where}: the {name} split is a {type(split).__name__}, not a map-style Dataset")
        if len(split) == 0:
            raise DataError(f"{where}: the {name} split is empty")
    if isinstance(train, ImageTensors) != isinstance(test, ImageTensors):
        raise ConfigError(f"{where}: give both splits in memory or neither (train is {type(train).__name__}, test "
                          f"is {type(test).__name__})")
    shape = train.images.shape[1:] if isinstance(train, ImageTensors) else _check_sample(train, "train", where)
    if not isinstance(test, ImageTensors):
        test_shape = _check_sample(test, "test", where)
        if test_shape != shape:
            raise DataError(f"{where}: train samples are {list(shape)} but test samples {list(test_shape)}")
    classes = _num_classes(train, cfg, where)
    names = getattr(train, "classes", None)
    names = [str(n) for n in names] if isinstance(names, (list, tuple)) and len(names) == classes else \
        [str(i) for i in range(classes)]
    c = shape[0]
    if isinstance(train, ImageTensors):
        x = train.images.float().div(255)
        mean, std = tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist())
    else:
        mean = tuple(getattr(train, "mean", (0.0,) * c))
        std = tuple(getattr(train, "std", (1.0,) * c))
    info = DataInfo(classes, c, (int(shape[1]), int(shape[2])), mean, std, class_names=names)
    return Splits(train, test, info)


def _in_memory(split) -> ImageTensors | None:
    """A TensorDataset of uint8 images [N,C,H,W] and labels [N] -> ImageTensors (device-resident path)."""
    if isinstance(split, ImageTensors):
        return split
    if isinstance(split, TensorDataset) and len(split.tensors) == 2:
        images, labels = split.tensors
        if images.dtype == torch.uint8 and images.dim() == 4 and labels.dim() == 1:
            return ImageTensors(images, labels.long())
    return None


def _check_sample(split, name: str, where: str) -> torch.Size:
    sample = split[0]
    ok = isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[0], torch.Tensor) \
        and sample[0].dim() == 3 and sample[0].is_floating_point() and _is_int(sample[1])
    if not ok:
        got = (f"({', '.join(_describe(v) for v in sample)})" if isinstance(sample, (tuple, list))
               else _describe(sample))
        raise DataError(f"{where}: {name}[0] is {got}; samples must be (float image tensor [C, H, W], int label) "
                        "(or return uint8 tensors in a TensorDataset for the device-resident path)")
    return sample[0].shape


def _is_int(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point()


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {list(v.shape)}"
    return f"a {type(v).__name__}"


def _num_classes(train, cfg: DataConfig, where: str) -> int:
    if cfg.num_classes is not None:
        return cfg.num_classes
    classes = getattr(train, "classes", None)
    if isinstance(classes, (list, tuple)) and classes:
        return len(classes)
    labels = train.labels if isinstance(train, ImageTensors) else getattr(train, "targets", None)
    if labels is None:
        log.info("%s: no data.num_classes, train.classes or train.targets: scanning %d labels", where, len(train))
        labels = [int(train[i][1]) for i in range(len(train))]
    labels = torch.as_tensor(labels)
    if labels.numel() == 0 or labels.min() < 0:
        raise DataError(f"{where}: labels must be integers 0..C-1, found {labels.min().item()}")
    return int(labels.max()) + 1
