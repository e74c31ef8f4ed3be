"""Wrap the model for data parallelism (DDP or FSDP2) and control gradient sync for accumulation."""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..config import ParallelConfig, TrainConfig
from ..env import DistEnv


def wrap(model: nn.Module, pcfg: ParallelConfig, tcfg: TrainConfig, env: DistEnv) -> nn.Module:
    """Returns the module the step loop calls. The caller keeps the unwrapped `model` for state_dicts,
    so no 'module.'/'_orig_mod.' prefixes ever reach a checkpoint."""
    if pcfg.strategy == "fsdp" and env.distributed:
        from .fsdp import shard_model

        wrapped = shard_model(model, tcfg, env)
    elif env.distributed:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        # gradients as views into the all-reduce buckets: no copy into the buckets and back every step
        wrapped = DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)
    else:
        wrapped = model
    if tcfg.compile:
        mode = None if tcfg.compile is True or tcfg.compile == "default" else tcfg.compile
        wrapped = torch.compile(wrapped, mode=mode)
    return wrapped


def _inner(wrapped: nn.Module) -> nn.Module:
    return getattr(wrapped, "_orig_mod", wrapped)  # the module torch.compile wrapped, not a key prefix


@contextlib.contextmanager
def grad_sync(wrapped: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation window."""
    inner = _inner(wrapped)
    if enabled:
        yield
    elif isinstance(inner, DDP):
        with inner.no_sync():
            yield
    elif hasattr(inner, "set_requires_gradient_sync"):  # FSDP2
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
    else:
        yield
