"""Model and optimizer state in a form every strategy reads and writes alike.

Consolidated (the step_*.pt file): full tensors, optimizer state keyed by parameter name
(torch.distributed.checkpoint.state_dict), gathered to rank 0 under FSDP. A DDP run resumes from an
FSDP checkpoint and the other way round. Sharded (FSDP only, step_*.dcp/): torch.distributed.checkpoint
with one file per rank, so a same-size FSDP job resumes without gathering the model anywhere."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .fsdp import is_fsdp


def _dcp():
    """torch.distributed.checkpoint.state_dict, imported for FSDP only: its import costs ~1.1 s of every
    process's start-up, and a plain module's state needs none of it (see named_optimizer_state)."""
    from torch.distributed.checkpoint import state_dict

    return state_dict


def _full():
    return _dcp().StateDictOptions(full_state_dict=True, cpu_offload=True)


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() keyed by parameter name, in the form torch.distributed.checkpoint's full
    optimizer state dict has for an unsharded module: {"state": {name: ...}, "param_groups": [{...,
    "params": [names]}]}, so checkpoints of every strategy read alike."""
    names = {id(param): name for name, param in model.named_parameters()}
    sd = optimizer.state_dict()
    by_index = {}
    for group, saved in zip(optimizer.param_groups, sd["param_groups"]):
        by_index.update({i: names[id(param)] for i, param in zip(saved["params"], group["params"])})
    return {"state": {by_index[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [by_index[i] for i in g["params"]]} for g in sd["param_groups"]]}


def load_named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, named: dict) -> None:
    """The inverse: back to the indices optimizer.load_state_dict expects."""
    names = {id(param): name for name, param in model.named_parameters()}
    index, groups = {}, []
    for group, saved in zip(optimizer.param_groups, named["param_groups"]):
        ours = [names[id(param)] for param in group["params"]]
        if set(ours) != set(saved["params"]):
            raise KeyError(f"the checkpoint's optimizer holds other parameters: {sorted(set(ours) ^ set(saved['params']))[:3]}")
        ids = [len(index) + k for k in range(len(ours))]
        index.update(zip(ours, ids))
        groups.append({**saved, "params": ids})
    optimizer.load_state_dict({"state": {index[n]: v for n, v in named["state"].items()}, "param_groups": groups})


def consolidated(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Collective under FSDP (every rank calls it); the full state is on rank 0 (others get {})."""
    if not is_fsdp(model):
        return model.state_dict(), named_optimizer_state(model, optimizer)
    sd = _dcp()
    return (sd.get_model_state_dict(model, options=_full()),
            sd.get_optimizer_state_dict(model, optimizer, options=_full()))


def module_state(module: nn.Module) -> dict:
    """A module's full state (collective under FSDP): extra modules such as the EMA copy."""
    return _dcp().get_model_state_dict(module, options=_full()) if is_fsdp(module) else module.state_dict()


def load_module_state(module: nn.Module, state: dict) -> None:
    if is_fsdp(module):
        _dcp().set_model_state_dict(module, state, options=_dcp().StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(state, strict=True)


def load_consolidated(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Every rank passes the full state it read; FSDP keeps only its own shard."""
    if is_fsdp(model):
        sd = _dcp()
        sd.set_model_state_dict(model, model_sd, options=sd.StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(model_sd, strict=True)
    optim_sd = _with_our_kernels(optimizer, optim_sd)
    if _keyed_by_index(optim_sd):  # written by optimizer.state_dict() (checkpoint format 1)
        optimizer.load_state_dict(optim_sd)
    elif not is_fsdp(model):
        load_named_optimizer_state(model, optimizer, optim_sd)
    else:
        sd = _dcp()
        sd.set_optimizer_state_dict(model, optimizer, optim_sd, options=sd.StateDictOptions(full_state_dict=True))


KERNEL_KEYS = ("fused", "foreach")  # optim.implementation, as torch keeps it in every param group


def _with_our_kernels(optimizer: torch.optim.Optimizer, optim_sd: dict) -> dict:
    """A checkpoint's param groups carry the kernels of the run that saved it, and load_state_dict would
    restore them; this run's choice stands (a DDP run's fused=True has no kernel for the DTensors of an
    FSDP run resuming from it, and optim.implementation may have been changed on purpose)."""
    ours = {k: optimizer.defaults[k] for k in KERNEL_KEYS if k in optimizer.defaults}
    return {**optim_sd, "param_groups": [{**g, **ours} for g in optim_sd.get("param_groups", [])]}


def _keyed_by_index(optim_sd: dict) -> bool:
    groups = optim_sd.get("param_groups") or [{}]
    params = groups[0].get("params") or []
    return bool(params) and isinstance(params[0], int)


def _sharded_state(model, optimizer, modules: dict | None) -> dict:
    modules, sd = modules or {}, _dcp()
    return {"model": sd.get_model_state_dict(model), "optim": sd.get_optimizer_state_dict(model, optimizer),
            **{f"module.{name}": sd.get_model_state_dict(m) for name, m in modules.items()}}


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path, modules: dict | None = None) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(model, optimizer, modules), checkpoint_id=str(directory))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path, modules: dict | None = None) -> None:
    import torch.distributed.checkpoint as dcp

    state = _sharded_state(model, optimizer, modules)
    dcp.load(state, checkpoint_id=str(directory))
    sd = _dcp()
    sd.set_model_state_dict(model, state["model"])
    sd.set_optimizer_state_dict(model, optimizer, _with_our_kernels(optimizer, state["optim"]))
    for name, m in (modules or {}).items():
        sd.set_model_state_dict(m, state[f"module.{name}"])
