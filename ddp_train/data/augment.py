"""Randomness that is a function of the sample: seeds for a sample's transforms on the DataLoader path
(keyed_rng: torch/numpy/random seeded by (seed, epoch, index)), counter-based uniforms on the device
(keyed_uniform), and the device batch augmentation built on them. No generator state exists per rank,
so 1, 2 or N processes and a resume on any world size draw the same transform for the same sample."""
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


_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (x in [0, 2^32), int64): xor-shift-multiply twice. The multiplier is below
    2^31, so no product leaves int64; integer ops give the same bits on every device."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def keyed_uniform(seed: int, epoch: int, index: torch.Tensor, draws: int) -> torch.Tensor:
    """[len(index), draws] uniforms in [0, 1), each a function of (seed, epoch, sample index, draw number)
    only: counter-based, so no generator state exists, and any rank, world size or resume gets the same."""
    base = sample_seed(seed, epoch, 0) & _M32
    per_sample = _hash32((_hash32(index.long() & _M32) ^ base) & _M32)
    k = torch.arange(draws, device=index.device, dtype=torch.long) * _GOLDEN & _M32
    bits = _hash32((per_sample.unsqueeze(1) + k) & _M32)
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


class BatchAugment:
    """One random affine per sample (rotation, translation) through affine_grid/grid_sample, plus
    horizontal flips where they keep the label. Every draw is keyed by (seed, epoch, global sample index):
    nothing to checkpoint, the same transform of a sample at any world size and after any resume."""

    def __init__(self, seed: int, flips: bool, max_degrees: float = 10.0, max_shift_px: float = 2.0):
        self.seed, self.flips = seed, flips
        self.max_radians = math.radians(max_degrees)
        self.max_shift_px = max_shift_px

    def __call__(self, x: torch.Tensor, epoch: int, index: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        u = keyed_uniform(self.seed, epoch, index.to(x.device), 4) * 2 - 1  # in [-1, 1)
        angle = u[:, 0] * self.max_radians
        # affine_grid works in [-1, 1] coordinates: a shift of p pixels is 2p / size.
        tx = u[:, 1] * (2 * self.max_shift_px / w)
        ty = u[:, 2] * (2 * self.max_shift_px / h)
        cos, sin = angle.cos(), angle.sin()
        sx = torch.ones(n, device=x.device)
        if self.flips:
            sx = torch.where(u[:, 3] < 0, -sx, sx)
        theta = torch.stack([torch.stack([cos * sx, -sin, tx], 1), torch.stack([sin * sx, cos, ty], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        # border: the edge pixels (background) fill what the shift uncovers, in normalised units
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
