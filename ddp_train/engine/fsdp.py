"""FSDP2 (torch.distributed.fsdp.fully_shard): shard each block, then the root, over one flat mesh.
bf16 goes through a MixedPrecisionPolicy (params and compute in bf16, gradient reduction in fp32) rather
than autocast. Norm layers keep fp32 (their own FSDP unit with an fp32 policy, casting their output back
to bf16), as FSDP1's mixed precision did: BatchNorm's running statistics are fp32 buffers, and bf16
weights beside them fail ("expected scalar type BFloat16 but found Float") or lose precision.
Gradient accumulation uses set_requires_gradient_sync (parallel.grad_sync)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import TrainConfig
from ..env import DistEnv

# The repeated units worth their own all-gather: torchvision's residual and MBConv blocks. Models without
# them (the seed MLP/CNNs) shard each direct child that holds parameters.
BLOCK_NAMES = ("BasicBlock", "Bottleneck", "MBConv", "FusedMBConv")


def blocks(model: nn.Module) -> list[nn.Module]:
    found = [m for m in model.modules() if type(m).__name__ in BLOCK_NAMES]
    if found:
        return found
    return [child for child in model.children() if any(True for _ in child.parameters())]


NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def shard_model(model: nn.Module, tcfg: TrainConfig, env: DistEnv) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    mp = MixedPrecisionPolicy()
    if tcfg.precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        fp32_norm = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                         output_dtype=torch.bfloat16)
        for norm in [m for m in model.modules() if isinstance(m, NORMS) and any(True for _ in m.parameters())]:
            # innermost first, as fully_shard requires; kept unsharded after forward (tiny) to save a gather
            fully_shard(norm, mesh=mesh, mp_policy=fp32_norm, reshard_after_forward=False)
    for block in blocks(model):
        if not is_fsdp(block):  # a norm layer that is itself a top-level child is already its own unit
            fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # the root: whatever is left (stem, head)
    return model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
