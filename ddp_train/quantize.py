"""int8 post-training quantization for CPU inference (`python -m ddp_train.export RUN --quantize dynamic`).

Convolutions can only be quantized statically on CPU: models with Conv layers go through FX graph mode
(prepare_fx with the x86 qconfig, calibrated on a few hundred training samples, convert_fx), which
quantizes convolutions and Linear layers alike; models without convolutions, or that FX cannot trace, get
dynamic quantization of their Linear layers (quantize_dynamic: int8 weights, activations quantized on the
fly). Both are torch.ao.quantization, deprecated in favour of torchao but still shipped with torch; the
deprecation notices are silenced here. The result is evaluated on the test split against fp32: top-1,
file size and CPU latency per batch, and the tool fails when top-1 drops by more than --max-drop."""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def quantize(model: nn.Module, calibration: list[torch.Tensor]) -> tuple[nn.Module, str]:
    """(int8 model, how): static FX quantization when the model has convolutions, else dynamic."""
    import torch.ao.quantization as q

    model = copy.deepcopy(model).eval().cpu()  # the caller keeps its fp32 model
    with _quiet():
        if any(isinstance(m, nn.Conv2d) for m in model.modules()):
            try:
                from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

                prepared = prepare_fx(model, q.get_default_qconfig_mapping("x86"), (calibration[0],))
                with torch.no_grad():
                    for x in calibration:
                        prepared(x)
                return convert_fx(prepared), "static (FX): convolutions and Linear layers, int8"
            except Exception as e:  # a model FX cannot trace: fall back to what still works
                fallback = f"; FX static quantization failed ({type(e).__name__}), so convolutions stay fp32"
        else:
            fallback = ""
        return q.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8), "dynamic: Linear layers, int8" + fallback


def save_scripted(model: nn.Module, example: torch.Tensor, path: Path) -> int:
    with _quiet(), torch.no_grad():
        torch.jit.trace(model, example, check_trace=False).save(str(path))
    return path.stat().st_size


@torch.no_grad()
def top1(model: nn.Module, batches) -> float:
    hits = count = 0
    for x, y in batches:
        hits += (model(x).argmax(1) == y).sum().item()
        count += len(y)
    return hits / max(count, 1)


@torch.no_grad()
def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 20) -> float:
    model(x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)
