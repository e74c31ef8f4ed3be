"""Numbers that follow from the config and the world size, computed once, in one place. Torch-free:
the SLURM launcher checks them on the login node."""
from __future__ import annotations

from ..errors import ConfigError
from .schema import Config


def micro_batch_size(cfg: Config, world_size: int) -> int:
    """Batch size is global: per-rank micro-batch = global / (world x grad_accum)."""
    t = cfg.train
    parts = world_size * t.grad_accum_steps
    if t.global_batch_size % parts:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} does not divide by world size "
                          f"{world_size} x train.grad_accum_steps {t.grad_accum_steps}: use a multiple of {parts}")
    micro = t.global_batch_size // parts
    if (cfg.data.mixup_alpha > 0 or cfg.data.cutmix_alpha > 0) and micro % 2:
        raise ConfigError(f"data.mixup_alpha/data.cutmix_alpha mix the global batch's samples in pairs, which a "
                          f"micro-batch must hold whole: train.global_batch_size={t.global_batch_size} / (world "
                          f"size {world_size} x train.grad_accum_steps {t.grad_accum_steps}) = {micro} is odd; "
                          f"use a multiple of {2 * parts}")
    return micro


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Optimizer steps the run takes: train.epochs of the data, capped by train.max_steps."""
    total = cfg.train.epochs * steps_per_epoch
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total
