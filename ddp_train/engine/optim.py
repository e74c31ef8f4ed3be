"""Optimizer and per-step LR schedule. Built after the model is wrapped (FSDP2 replaces parameters)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig, SchedConfig


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    # Weight decay on weights only: decaying biases and norm scales hurts and is what timm/Lightning skip.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(cfg: SchedConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base LR after `step` optimizer steps (linear warmup, then the schedule)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "step":
        return cfg.gamma ** (step // (cfg.step_size_epochs * steps_per_epoch))
    if cfg.name == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(cfg: SchedConfig, optimizer: torch.optim.Optimizer, lr: float, total_steps: int,
                    steps_per_epoch: int):
    if cfg.name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(2, total_steps),
                                                   pct_start=cfg.pct_start)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, total_steps, steps_per_epoch))
