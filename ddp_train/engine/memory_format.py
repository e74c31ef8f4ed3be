"""train.channels_last: auto picks the memory format of the model and its batches.

Why auto turns it on for convolutional models on the CPU: oneDNN's convolutions run in NHWC, and an
NCHW model pays a reorder into and out of every convolution. The seeds' CNN trained 21 % faster in
channels_last on 2 vCPUs (benchmarks/peers.py, docs/benchmarks.md), forward + backward 21-25 % faster
at batch 32 and 64. On a GPU the gain depends on the precision, the GPU and cuDNN; auto leaves it off
there until the GPU benchmark has measured it (the shipped ResNet/EfficientNet configs set it), and
under FSDP, which shards parameters along their first dimension.

A model whose forward cannot take a channels_last tensor (typically `x.view(n, -1)` after a
convolution, where `reshape`/`flatten` would work) is found on a copy of fake tensors (torch's
FakeTensorMode: the CPU's shapes and strides, no memory, no compute) before anything is allocated, and
keeps NCHW. (The meta device does not do: its convolution returns NCHW whatever the input.)"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..tracking.flops import scalar_of, shadow_copy

log = logging.getLogger("ddp_train")


def use_channels_last(setting: bool | str, model: nn.Module, sample_shape: tuple[int, ...],
                      device: torch.device, sharded: bool) -> bool:
    """The memory format the run uses: `setting` when it is true/false, else auto's choice (logged)."""
    if setting != "auto":
        return bool(setting)
    reason = _auto_off_reason(model, sample_shape, device, sharded)
    log.info("memory format: %s (train.channels_last=auto%s)", "NCHW" if reason else "channels_last",
             f": {reason}" if reason else ": a convolutional model on the CPU")
    return reason is None


def _auto_off_reason(model: nn.Module, sample_shape: tuple[int, ...], device: torch.device,
                     sharded: bool) -> str | None:
    if device.type != "cpu":
        return f"not measured on {device.type} yet"
    if sharded:
        return "FSDP"
    if len(sample_shape) != 3 or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return "no 2-D convolution"
    return forward_fails(model, sample_shape)


def forward_fails(model: nn.Module, sample_shape: tuple[int, ...]) -> str | None:
    """Why a training forward and backward of `model` (on the CPU) fails on channels_last inputs, or None
    when it works; run on fake tensors (no memory, no compute, no random draws, the model untouched)."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode  # private, but what torch.compile runs on

        mode = FakeTensorMode()

        def fake(t: torch.Tensor) -> torch.Tensor:  # laid out as model.to(memory_format=...) would
            layout = torch.channels_last if t.dim() == 4 else torch.preserve_format
            return mode.from_tensor(torch.empty_like(t, memory_format=layout))  # its pages are never touched

        probe = shadow_copy(model, fake).train()
        x = mode.from_tensor(torch.empty((2, *sample_shape), memory_format=torch.channels_last))
        with mode:
            scalar_of(probe(x)).backward()
        return None
    except Exception as e:  # a .view the layout cannot take, an op without a fake kernel, ...
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"the model's forward fails on channels_last tensors ({type(e).__name__}: {first})"
