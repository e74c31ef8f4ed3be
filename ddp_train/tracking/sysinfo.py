"""Process-level numbers worth comparing between runs: peak host RSS and peak GPU memory."""
from __future__ import annotations

import resource
import sys

import torch


def peak_memory(device: torch.device) -> dict[str, float | None]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_gb = rss / 2**30 if sys.platform == "darwin" else rss / 2**20
    gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"peak_rss_gb": round(rss_gb, 3), "peak_gpu_mem_gb": None if gpu is None else round(gpu, 3)}
