"""Process-level numbers worth comparing between runs: peak host RSS and peak GPU memory."""
from __future__ import annotations

import resource
import sys
from contextlib import contextmanager

import torch


def peak_memory(device: torch.device) -> dict[str, float | None]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_gb = rss / 2**30 if sys.platform == "darwin" else rss / 2**20
    gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"peak_rss_gb": round(rss_gb, 3), "peak_gpu_mem_gb": None if gpu is None else round(gpu, 3)}


def _rusage() -> tuple[int, float]:
    """(minor page faults so far, peak RSS in MiB) of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


class ProcessCounters:
    """The allocator's symptom, per log window: minor page faults per step (memory handed back to the
    kernel and faulted in again, see ddp_train.allocator) and the growth of peak RSS. One getrusage call
    per log step, no device sync. The first window pays start-up's first touches; `summary()` leaves it out.
    RSS growth counts everything (an evaluation's peak too)."""

    def __init__(self):
        self._faults, self._rss = _rusage()
        self._windows = 0
        self._steady_faults = self._steady_steps = 0
        self._steady_rss: float | None = None

    @contextmanager
    def excluded(self):
        """Evaluation and checkpoint saves are not steps (an eval batch of 500 can pass glibc's 32 MiB mmap
        ceiling): their faults are left out of the step figures."""
        before = _rusage()[0]
        try:
            yield
        finally:
            self._faults += _rusage()[0] - before

    def window(self, steps: int) -> dict[str, float]:
        faults, rss = _rusage()
        new_faults, growth = max(0, faults - self._faults), rss - self._rss
        self._faults, self._rss = faults, rss
        self._windows += 1
        if self._windows == 1:
            self._steady_rss = rss
        else:
            self._steady_faults += new_faults
            self._steady_steps += steps
        return {"sys/minor_faults_per_step": new_faults / max(steps, 1), "sys/peak_rss_growth_mb": growth}

    def summary(self) -> dict[str, float | None]:
        """After the first log window: faults per step, and how far peak RSS grew (MiB)."""
        _, rss = _rusage()
        steady = self._steady_steps > 0
        return {"minor_faults_per_step": round(self._steady_faults / self._steady_steps, 2) if steady else None,
                "peak_rss_growth_mb": round(rss - self._steady_rss, 1) if self._steady_rss is not None else None}
