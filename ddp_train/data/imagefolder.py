"""`data.name=imagefolder`: your own images in class folders, <root>/train/<class>/* and <root>/val/<class>/*.

Training: RandomResizedCrop(image_size) + horizontal flip; evaluation (seed 004's pipeline): Resize(256)
-> CenterCrop(224) -> Normalize(ImageNet mean/std), scaled with data.image_size. Files are decoded in
DataLoader workers. An unreadable image stops the run with an error naming the file, or with
data.skip_corrupt=true the unreadable files are found up front (PIL verify), skipped and counted."""
from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import Dataset

from ..config import DataConfig
from ..errors import DataError
from .types import IMAGENET_STATS, DataInfo, Splits, eval_resize

log = logging.getLogger("ddp_train")
CORRUPT_HINT = "fix or remove it, or set data.skip_corrupt=true to skip unreadable files"


class ImageFiles(Dataset):
    def __init__(self, samples: list[tuple[str, int]], transform, classes: list[str]):
        self.samples, self.transform, self.classes = samples, transform, classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(open_image(path)), label


def open_image(path: str, mode: str = "RGB"):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError and truncated files are OSError
        raise DataError(f"cannot read image {path} ({type(e).__name__}: {str(e)[:120]}); {CORRUPT_HINT}") from None


def transforms_for(cfg: DataConfig, mean, std):
    from torchvision import transforms as T

    size = cfg.image_size
    resize = eval_resize(size, cfg.resize_size)
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    evaluation = T.Compose([T.Resize(resize), T.CenterCrop(size), *norm])
    if cfg.augment:
        from torchvision.transforms import v2

        # RandAugment on the PIL image, RandomErasing on the normalised tensor (as timm orders them)
        policy = [v2.RandAugment()] if cfg.randaugment else []
        erase = [v2.RandomErasing(p=cfg.random_erasing)] if cfg.random_erasing else []
        train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *policy, *norm, *erase])
    else:
        train = evaluation
    return train, evaluation, resize


def _readable(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def scan(directory: Path, class_to_idx: dict[str, int] | None, skip_corrupt: bool):
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not directory.is_dir():
        raise DataError(f"data.name=imagefolder needs {directory}/<class>/<image files>; {directory} does not "
                        "exist (set data.root to the folder holding train/ and val/)")
    classes, found = find_classes(str(directory))
    if class_to_idx is not None:
        unknown = sorted(set(classes) - set(class_to_idx))
        if unknown:
            raise DataError(f"{directory} has classes that train/ does not: {', '.join(unknown[:5])}")
    else:
        class_to_idx = found
    try:
        samples = make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"{directory}: {e}") from None
    if not samples:
        raise DataError(f"{directory} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
    if skip_corrupt:
        good, bad = [], []
        for sample in samples:
            (good if _readable(sample[0]) else bad).append(sample)
        if bad:
            log.warning("skipped %d unreadable image(s) in %s (data.skip_corrupt=true), e.g. %s", len(bad),
                        directory, bad[0][0])
        samples = good
    return sorted(class_to_idx, key=class_to_idx.get), class_to_idx, samples


def scan_folders(cfg: DataConfig) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """(classes, train samples, val samples): the part worth doing once per job, on rank 0."""
    root = Path(cfg.root)
    classes, class_to_idx, train = scan(root / "train", None, cfg.skip_corrupt)
    _, _, val = scan(root / "val", class_to_idx, cfg.skip_corrupt)
    return classes, train, val


def open_imagefolder(cfg: DataConfig, scanned):
    classes, train, val = scanned
    train_tf, eval_tf, _ = transforms_for(cfg, *IMAGENET_STATS)
    info = DataInfo(len(classes), 3, (cfg.image_size, cfg.image_size), *IMAGENET_STATS, class_names=classes,
                    flips=True)
    return Splits(ImageFiles(train, train_tf, classes), ImageFiles(val, eval_tf, classes), info)
