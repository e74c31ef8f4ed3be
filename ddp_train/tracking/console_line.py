"""What rank 0 prints per log interval. `log.console_metrics=short` (default): one line an operator reads at
a glance in a SLURM .out (step, loss, top-1, lr, samples/s, data wait, MFU and memory where known, skipped
steps when there are any, the slowest rank only when it is a straggler); `all`: every metric, as
metrics.jsonl, W&B and TensorBoard always get them. Evaluation rows are short already and print whole."""
from __future__ import annotations

import math
from typing import Any


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def full_line(metrics: dict, step: int) -> str:
    parts = [f"step {step}"] + [f"{k} {fmt(v)}" for k, v in metrics.items() if k != "epoch"]
    if "epoch" in metrics:
        parts.insert(0, f"epoch {metrics['epoch']}")
    return " | ".join(parts)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%" if math.isfinite(v) else str(v)


def short_line(metrics: dict, step: int, straggler_factor: float) -> str:
    """The training row in a few fields; any other row (an evaluation's) as full_line."""
    if "train/loss" not in metrics:
        return full_line(metrics, step)
    m = metrics.get
    parts = [f"step {step}"]
    if "epoch" in metrics:
        parts.insert(0, f"epoch {metrics['epoch']}")
    parts.append(f"loss {fmt(metrics['train/loss'])}")
    if m("train/top1") is not None:
        parts.append(f"top1 {_pct(metrics['train/top1'])}")
    if m("train/lr") is not None:
        parts.append(f"lr {metrics['train/lr']:.3g}")
    if m("train/samples_per_s") is not None:
        parts.append(f"{metrics['train/samples_per_s']:,.0f} samples/s")
    if m("train/data_wait_frac") is not None:
        parts.append(f"data wait {_pct(metrics['train/data_wait_frac'])}")
    if m("perf/mfu") is not None:
        parts.append(f"MFU {_pct(metrics['perf/mfu'])}")
    if m("sys/peak_gpu_mem_gb") is not None:
        parts.append(f"GPU mem {metrics['sys/peak_gpu_mem_gb']:.1f} GB")
    if m("train/skipped_steps"):
        parts.append(f"skipped {metrics['train/skipped_steps']}")
    ratio = m("sys/slowest_ratio")
    if ratio is not None and ratio >= straggler_factor:
        parts.append(f"slowest rank {metrics['sys/slowest_rank']} ({metrics['sys/slowest_host']}) {ratio:.1f}x")
    return " | ".join(parts)
