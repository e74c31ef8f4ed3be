"""Batch augmentation on the device: one random affine (rotation, translation) per sample through
affine_grid/grid_sample, plus horizontal flips where they keep the label. Its generator is seeded per
rank and saved in checkpoints, so a resumed run draws the same transforms as an uninterrupted one."""
from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import torch
import torch.nn.functional as F

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's random draws in one epoch: a function of the sample, never of the rank."""
    return _mix64(_mix64(_mix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64)) >> 1  # < 2**63


@contextlib.contextmanager
def keyed_rng(seed: int, epoch: int, index: int, restore: bool):
    """torch, numpy and random seeded for one sample; `restore` puts the previous states back afterwards
    (needed in the training process, where the global generators also drive dropout)."""
    key = sample_seed(seed, epoch, index)
    saved = (torch.get_rng_state(), np.random.get_state(), random.getstate()) if restore else None
    torch.manual_seed(key)
    np.random.seed(key & 0xFFFFFFFF)
    random.seed(key)
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


class BatchAugment:
    def __init__(self, seed: int, rank: int, device: torch.device, flips: bool,
                 max_degrees: float = 10.0, max_shift_px: float = 2.0):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed * 1_000_003 + rank)
        self.device, self.flips = device, flips
        self.max_radians = math.radians(max_degrees)
        self.max_shift_px = max_shift_px

    def _uniform(self, n: int, bound: float) -> torch.Tensor:
        return (torch.rand(n, device=self.device, generator=self.generator) * 2 - 1) * bound

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        angle = self._uniform(n, self.max_radians)
        # affine_grid works in [-1, 1] coordinates: a shift of p pixels is 2p / size.
        tx = self._uniform(n, 2 * self.max_shift_px / w)
        ty = self._uniform(n, 2 * self.max_shift_px / h)
        cos, sin = angle.cos(), angle.sin()
        sx = torch.ones(n, device=self.device)
        if self.flips:
            flip = torch.rand(n, device=self.device, generator=self.generator) < 0.5
            sx = torch.where(flip, -sx, sx)
        theta = torch.stack([torch.stack([cos * sx, -sin, tx], 1), torch.stack([sin * sx, cos, ty], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        # border: the edge pixels (background) fill what the shift uncovers, in normalised units
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
