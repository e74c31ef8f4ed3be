"""Optimizer state in its parameter's memory layout, after every load.

`optimizer.load_state_dict` keeps the strides of the tensors it is given (torch moves them with `.to`,
which preserves the format). A checkpoint written in one layout and loaded into parameters of another
(NCHW <-> channels_last, FSDP's gathered full tensors into channels_last conv weights) leaves exp_avg /
exp_avg_sq / momentum_buffer in the other layout than the parameter and its gradient. The fused kernels
assume that param, grad and state share one layout and walk their storage in lockstep: Adam's fused step
from such a state moved conv weights by 7e-3 against the for-loop step at lr 1e-3 (same layouts: 3e-8),
every step after the resume, silently. (tests/test_optim_layout.py pins torch's behaviour.)

So every load goes through a post-hook that copies each state tensor shaped like its parameter into the
parameter's strides (whatever path called load_state_dict: the consolidated checkpoint, DCP's
set_optimizer_state_dict, the NaN guard's rollback, a user's own call), and the first step after a load
checks that it holds: an error naming the parameter, never a step on mismatched tensors."""
from __future__ import annotations

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (what the kernels see), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _same_layout(state: torch.Tensor, param: torch.Tensor) -> bool:
    return _local(state).stride() == _local(param).stride()


def _in_layout_of(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    if hasattr(param, "to_local"):  # DTensor: empty_like keeps the placements and the local strides
        out = torch.empty_like(param, dtype=value.dtype, device=value.device)
    else:
        out = torch.empty_strided(param.size(), param.stride(), dtype=value.dtype, device=value.device)
    with torch.no_grad():
        out.copy_(value)
    return out


def _shaped_like(value, param: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == param.shape


def relayout_state(optimizer: torch.optim.Optimizer) -> int:
    """Each state tensor shaped like its parameter takes the parameter's strides; returns how many moved."""
    moved = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            for key, value in (state or {}).items():
                if _shaped_like(value, param) and not _same_layout(value, param):
                    state[key] = _in_layout_of(param, value)
                    moved += 1
    return moved


def mismatches(optimizer: torch.optim.Optimizer) -> list[str]:
    """'<param index>.<state key>: state strides vs parameter strides' for every tensor out of layout."""
    out = []
    for g, group in enumerate(optimizer.param_groups):
        for i, param in enumerate(group["params"]):
            for key, value in (optimizer.state.get(param) or {}).items():
                if _shaped_like(value, param) and not _same_layout(value, param):
                    out.append(f"group {g} param {i} {key}: strides {_local(value).stride()} vs the "
                               f"parameter's {_local(param).stride()}")
    return out


class LayoutMismatch(RuntimeError):
    """Optimizer state out of its parameter's layout before a step: the update would be wrong."""


def keep_state_in_parameter_layout(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Registers the post-load relayout and the check before the first step after each load."""
    pending = {"check": False}

    def after_load(opt: torch.optim.Optimizer) -> None:
        relayout_state(opt)
        pending["check"] = True

    def before_step(opt: torch.optim.Optimizer, args, kwargs) -> None:
        if not pending["check"]:
            return
        pending["check"] = False
        bad = mismatches(opt)
        if bad:
            raise LayoutMismatch(f"optimizer state is not in its parameters' memory layout after loading a "
                                 f"checkpoint ({len(bad)} tensors; first: {bad[0]}): a fused/foreach step would "
                                 "apply wrong updates. Load optimizer state through optimizer.load_state_dict, "
                                 "which ddp_train hooks to fix the layout")

    optimizer.register_load_state_dict_post_hook(after_load)
    optimizer.register_step_pre_hook(before_step)
    return optimizer
