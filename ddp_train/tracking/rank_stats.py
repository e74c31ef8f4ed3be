"""Per-rank view, once per log interval: each rank's own time per step (waiting for data + forward,
the part of a step no collective paces: the all-reduce in backward makes every rank's total step time
the slowest one's), its data-wait fraction and, on a GPU, NVML's utilisation, memory, temperature and
power. One small all-gather on the CPU group at the log step; nothing per step.

Caveat: a DDP forward first broadcasts buffers (BatchNorm statistics), so on such models the fast ranks'
forward also includes waiting for the slow one; the data part still names a slow input pipeline."""
from __future__ import annotations

import logging
import statistics
import time

import torch

from .. import dist

log = logging.getLogger("ddp_train")
PERSISTENT_WINDOWS = 3  # log intervals in a row a rank must be the slow one before the warning


class GpuStats:
    """NVML (nvidia-ml-py) readings of this rank's GPU; absent (empty dict) on CPU or without NVML."""

    def __init__(self, device: torch.device):
        self.handle, self.nvml = None, None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = torch.cuda._get_nvml_device_index(device) if hasattr(torch.cuda, "_get_nvml_device_index") \
                else device.index or 0
            self.handle, self.nvml = pynvml.nvmlDeviceGetHandleByIndex(index), pynvml
        except Exception as e:  # no nvidia-ml-py, no driver access (some containers)
            log.info("GPU stats off: NVML unavailable (%s)", e)

    def read(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        n, h = self.nvml, self.handle
        try:
            mem = n.nvmlDeviceGetMemoryInfo(h)
            return {"util_pct": float(n.nvmlDeviceGetUtilizationRates(h).gpu), "mem_used_gb": mem.used / 2**30,
                    "temp_c": float(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
                    "power_w": n.nvmlDeviceGetPowerUsage(h) / 1000.0}
        except Exception:
            return {}


class RankStats:
    def __init__(self, device: torch.device, hosts: list[str], factor: float):
        self.hosts, self.factor = hosts, factor
        self.gpu = GpuStats(device)
        self.cuda = device.type == "cuda"
        self._events: list[tuple] = []
        self.forward_s = 0.0
        self.totals: dict[int, list[float]] = {}  # rank -> [own seconds, data wait seconds, steps]
        self._slow_streak: tuple[int, int] = (-1, 0)
        self.warned = False

    def forward_started(self):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return start
        return time.perf_counter()

    def forward_done(self, started) -> None:
        if self.cuda:  # read at the log step, which syncs anyway
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((started, end))
        else:
            self.forward_s += time.perf_counter() - started

    def gather(self, wait_s: float, seconds: float, steps: int) -> tuple[dict, list[dict]]:
        """Collective. (metrics for rank 0's log, every rank's row)."""
        forward = self.forward_s + sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
        self._events, self.forward_s = [], 0.0
        mine = {"own_s": (wait_s + forward) / max(steps, 1), "data_wait_frac": min(1.0, wait_s / max(seconds, 1e-9)),
                "wait_s": wait_s, "steps": steps, **self.gpu.read()}
        rows = dist.all_gather_object(mine)
        for r, row in enumerate(rows):
            t = self.totals.setdefault(r, [0.0, 0.0, 0])
            t[0] += row["own_s"] * row["steps"]
            t[1] += row["wait_s"]
            t[2] += row["steps"]
        metrics: dict = {}
        if len(rows) > 1:
            own = [row["own_s"] for row in rows]
            slow = max(range(len(own)), key=own.__getitem__)
            # the median of the other ranks: with two ranks the median of all is their mean, which
            # would cap the ratio below 2 however slow one is
            median = statistics.median(own[:slow] + own[slow + 1:])
            ratio = own[slow] / median if median > 0 else 1.0
            metrics = {"sys/slowest_rank": slow, "sys/slowest_host": self.hosts[slow],
                       "sys/slowest_ratio": ratio, "sys/slowest_data_wait_frac": rows[slow]["data_wait_frac"]}
            self._maybe_warn(slow, ratio)
        for r, row in enumerate(rows):
            for key in ("util_pct", "mem_used_gb", "temp_c", "power_w"):
                if key in row:
                    metrics[f"gpu/rank{r}/{key}"] = row[key]
        return metrics, rows

    def _maybe_warn(self, slow: int, ratio: float) -> None:
        rank, count = self._slow_streak
        count = count + 1 if (rank == slow and ratio >= self.factor) else (1 if ratio >= self.factor else 0)
        self._slow_streak = (slow, count)
        if count >= PERSISTENT_WINDOWS and not self.warned:
            self.warned = True
            log.warning("straggler: rank %d on %s has been %.1fx slower than the other ranks' median for %d log intervals "
                        "(its own time per step: data wait + forward); check that node's input pipeline, CPU "
                        "and GPU (summary.json per_rank has the table)", slow, self.hosts[slow], ratio, count)

    def table(self) -> list[dict]:
        """summary.json's per-rank table over the run."""
        return [{"rank": r, "host": self.hosts[r], "own_s_per_step": t[0] / max(t[2], 1),
                 "data_wait_s": t[1], "steps": t[2]} for r, t in sorted(self.totals.items())]
