"""Mixed precision policy: autocast dtype and a GradScaler that is only active for fp16."""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, name: str, device: torch.device, fsdp: bool = False):
        self.name = name
        self.dtype = DTYPES[name]
        self.device_type = device.type
        # FSDP2 casts through its MixedPrecisionPolicy instead of autocast.
        self.use_autocast = name != "fp32" and not fsdp
        # fp16 needs loss scaling; bf16 has fp32's exponent range and does not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=(name == "fp16"))

    def state_dict(self) -> dict:
        return self.scaler.state_dict()  # the GradScaler's scale and growth tracker (empty unless fp16)

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state)

    def autocast(self):
        if not self.use_autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def configure_backends(deterministic: bool, cudnn_benchmark: bool, tf32: bool) -> None:
    """Process-wide numerics. TF32 (fp32 matmuls/convs on tensor cores, 10-bit mantissa inputs, fp32
    accumulation) and cuDNN autotuning are the usual GPU defaults (timm, Lightning's recommendation);
    train.deterministic turns autotuning off and TF32 down, since both change results run to run."""
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        return
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
