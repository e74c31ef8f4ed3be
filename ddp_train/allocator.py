"""Fixed glibc malloc thresholds, set once at start-up, before the first large allocation.

Why: glibc's thresholds adapt at run time. Blocks above M_MMAP_THRESHOLD (128 KiB at first) get their
own mmap; freeing one raises the threshold to its size, and M_TRIM_THRESHOLD to twice that. A training
step allocates and frees several MiB of activations and gradients on the host; depending on the order in
which sizes first appeared, those blocks are either fresh mmaps every step or heap memory that free()
trims back to the kernel when the top of the heap passes the trim threshold. Either way the next step
faults the same pages in again: 2,775-6,078 minor faults per step measured on the seeds' CNN (about
24 MB a step), varying from run to run with the thresholds glibc happened to settle on, and up to 29 %
of the step time. Fixed thresholds end the adaptation: blocks up to 32 MiB come from the heap and stay
there, and the heap is trimmed only when 256 MiB lie free at its top. The cost is at most that much
memory kept by the process instead of returned.

A user who sets MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / GLIBC_TUNABLES (glibc.malloc.*) keeps
their setting; other C libraries are left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

from .env import getenv

MMAP_THRESHOLD = 32 * 2**20   # glibc's own ceiling for the adaptive threshold (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 256 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from <malloc.h>
_applied: dict | None = None


def fix_malloc_thresholds() -> dict:
    """Idempotent. Returns what the process runs with, for summary.json: {"mode": "fixed" | "environment"
    | "unavailable", "mmap_threshold", "trim_threshold"}."""
    global _applied
    if _applied is not None:
        return _applied
    if any(getenv(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) or \
            "glibc.malloc" in (getenv("GLIBC_TUNABLES") or ""):
        _applied = {"mode": "environment"}
        return _applied
    mallopt = _mallopt()
    if mallopt is None or not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        _applied = {"mode": "unavailable"}
        return _applied
    _applied = {"mode": "fixed", "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
    return _applied


def _mallopt():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn
