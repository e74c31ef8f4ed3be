"""Model and optimizer state in a form every strategy reads and writes alike.

Consolidated (the step_*.pt file): full tensors, optimizer state keyed by parameter name
(torch.distributed.checkpoint.state_dict), gathered to rank 0 under FSDP. A DDP run resumes from an
FSDP checkpoint and the other way round. Sharded (FSDP only, step_*.dcp/): torch.distributed.checkpoint
with one file per rank, so a same-size FSDP job resumes without gathering the model anywhere."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .fsdp import is_fsdp

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def consolidated(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Collective under FSDP (every rank calls it); the full state is on rank 0 (others get {})."""
    if not is_fsdp(model):
        return model.state_dict(), get_optimizer_state_dict(model, optimizer, options=FULL)
    return get_model_state_dict(model, options=FULL), get_optimizer_state_dict(model, optimizer, options=FULL)


def module_state(module: nn.Module) -> dict:
    """A module's full state (collective under FSDP): extra modules such as the EMA copy."""
    return get_model_state_dict(module, options=FULL) if is_fsdp(module) else module.state_dict()


def load_module_state(module: nn.Module, state: dict) -> None:
    if is_fsdp(module):
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(state, strict=True)


def load_consolidated(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Every rank passes the full state it read; FSDP keeps only its own shard."""
    if is_fsdp(model):
        set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(model_sd, strict=True)
    if _keyed_by_index(optim_sd):  # written by optimizer.state_dict() (checkpoint format 1)
        optimizer.load_state_dict(optim_sd)
    else:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))


def _keyed_by_index(optim_sd: dict) -> bool:
    groups = optim_sd.get("param_groups") or [{}]
    params = groups[0].get("params") or []
    return bool(params) and isinstance(params[0], int)


def _sharded_state(model, optimizer, modules: dict | None) -> dict:
    modules = modules or {}
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer),
            **{f"module.{name}": get_model_state_dict(m) for name, m in modules.items()}}


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path, modules: dict | None = None) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(model, optimizer, modules), checkpoint_id=str(directory))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path, modules: dict | None = None) -> None:
    import torch.distributed.checkpoint as dcp

    state = _sharded_state(model, optimizer, modules)
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    for name, m in (modules or {}).items():
        set_model_state_dict(m, state[f"module.{name}"])
