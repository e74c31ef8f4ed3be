"""Training FLOPs per sample, counted once with torch.utils.flop_counter on a meta-device copy of the
model (no memory, no compute, no random draws), and the achieved TFLOP/s and MFU they give. MFU is the
achieved rate over the device's dense bf16/fp16 tensor-core peak (PaLM's definition), so fp32 runs show
a low MFU on purpose; `train.peak_tflops` overrides the table (or sets a peak on a CPU)."""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

log = logging.getLogger("ddp_train")

# Dense bf16/fp16 tensor-core peaks per GPU (vendor data sheets, no sparsity), matched by substring of
# torch.cuda.get_device_name(); the first match wins, so the longer names come first.
PEAK_TFLOPS = [
    ("GB200", 2500.0), ("B200", 2250.0), ("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0),
    ("H100", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("A40", 150.0), ("A6000", 155.0), ("RTX 4090", 165.0),
    ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0), ("MI300X", 1307.0), ("MI250X", 383.0),
]


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def count_flops(model, sample_shape: tuple[int, ...], batch: int = 2) -> dict[str, float] | None:
    """{"forward": ..., "train": ...} FLOPs per sample of `model` (a module, copied to the meta device
    without touching it; or a factory, built there) on inputs of `sample_shape`.
    Training = forward + backward of a scalar of the logits (the loss's own cost is negligible). None when
    the model cannot run on meta tensors: the run goes on without the figures."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        if not isinstance(model, nn.Module):
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                model = model()
        if any(t.device.type != "meta" for t in [*model.parameters(), *model.buffers()]):
            model = meta_copy(model)
        model.train()
        x = torch.empty((batch, *sample_shape), device="meta")
        with FlopCounterMode(display=False) as forward:
            logits = model(x)
        with FlopCounterMode(display=False) as backward:
            scalar_of(logits).backward()
        fwd = forward.get_total_flops() / batch
        return {"forward": fwd, "train": fwd + backward.get_total_flops() / batch}
    except Exception as e:  # a custom op without a meta kernel, data-dependent shapes, ...
        log.info("FLOPs not counted (%s: %s); perf/tflops and MFU are left out", type(e).__name__, str(e)[:200])
        return None


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers are meta tensors: nothing of the size of the model is
    allocated."""
    return shadow_copy(model, lambda t: torch.empty_like(t, device="meta"))


def shadow_copy(model: nn.Module, make) -> nn.Module:
    """A deep copy of `model` whose every parameter and buffer is `make(tensor)` (a meta or fake tensor):
    deepcopy's memo maps each tensor to its stand-in before the copy reaches it, so the real ones are
    never copied."""
    memo = {}
    for t in [*model.parameters(), *model.buffers()]:
        stand_in = make(t.detach())
        memo[id(t)] = nn.Parameter(stand_in, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else stand_in
    return copy.deepcopy(model, memo)


def scalar_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    if isinstance(out, dict):
        out = list(out.values())
    return sum(o.float().sum() for o in out if isinstance(o, torch.Tensor))


def analytic_forward_flops(model: nn.Module, sample_shape: tuple[int, ...]) -> float:
    """2 x multiply-accumulates of every Conv2d and Linear, from their shapes (what papers quote): the
    check the counter is held to in the tests."""
    total, sizes = 0.0, {}

    def hook(module, inputs, output):
        sizes[module] = (inputs[0].shape, output.shape)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros((1, *sample_shape)))
    for h in handles:
        h.remove()
    for m, (_, out) in sizes.items():
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            total += 2 * k * out[1] * out[2] * out[3]
        else:
            total += 2 * m.in_features * m.out_features
    return total
