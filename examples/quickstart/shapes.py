"""A dataset that learns on a laptop CPU in seconds: 16x16 grey images of four shapes (circle, square,
cross, triangle) at random sizes and places, with noise. The training split shifts each image by a
random pixel or two in __getitem__: ddp_train seeds those draws by (seed, epoch, sample index), so they
are the same at any number of processes and after a resume."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

CLASSES = ["circle", "square", "cross", "triangle"]


def draw(label: int, cx: float, cy: float, r: float, size: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    dx, dy = x - cx, y - cy
    if label == 0:
        mask = dx ** 2 + dy ** 2 <= r ** 2
    elif label == 1:
        mask = (dx.abs() <= r * 0.8) & (dy.abs() <= r * 0.8)
    elif label == 2:
        mask = ((dx.abs() <= r / 3) & (dy.abs() <= r)) | ((dy.abs() <= r / 3) & (dx.abs() <= r))
    else:
        mask = (dy <= r * 0.8) & (dy >= -r) & (dx.abs() <= (dy + r) / 2)
    return mask.float()


class Shapes(Dataset):
    classes = CLASSES

    def __init__(self, n: int, size: int, seed: int, shift: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, len(CLASSES), (n,), generator=g)
        r = 3 + torch.rand(n, generator=g) * 3
        centre = size / 2 + (torch.rand(n, 2, generator=g) - 0.5) * (size - 2 * r.unsqueeze(1) - 2)
        noise = torch.randn(n, size, size, generator=g) * 0.15
        self.images = torch.stack([draw(int(c), float(x), float(y), float(rad), size) for c, (x, y), rad
                                   in zip(self.labels, centre, r)]) + noise
        self.targets = self.labels.tolist()
        self.shift = shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i]
        if self.shift:
            dx, dy = torch.randint(-self.shift, self.shift + 1, (2,)).tolist()
            image = torch.roll(image, shifts=(dy, dx), dims=(0, 1))
        return image.unsqueeze(0), int(self.labels[i])


def make_shapes(root: str, n_train: int = 2000, n_test: int = 500, size: int = 16, shift: int = 1):
    """The data.name factory: (train, test). `root` is unused: the images are drawn, not read."""
    return Shapes(n_train, size, seed=0, shift=shift), Shapes(n_test, size, seed=1, shift=0)
