"""What watches a run, assembled in one place for run.py: the hang sentinel, the NaN guard, the per-rank
view (stragglers, GPU stats), the profiler window and the FLOP count behind TFLOP/s and MFU; and the
summary.json fields they produce."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import dist
from ..config import Config
from ..env import DistEnv
from ..tracking.flops import peak_tflops
from ..tracking.loggers import Logger
from ..tracking.profiling import ProfileWindow
from ..tracking.rank_stats import RankStats
from .nan_guard import NanGuard
from .sentinel import HangSentinel


@dataclass
class Observers:
    guard: NanGuard
    sentinel: HangSentinel | None
    stats: RankStats
    profiler: ProfileWindow | None
    flops: dict | None
    peak_tflops: float | None

    def trainer_kwargs(self) -> dict:
        return {"guard": self.guard, "sentinel": self.sentinel, "stats": self.stats, "profiler": self.profiler,
                "flops": self.flops, "peak_tflops": self.peak_tflops}


def build_observers(cfg: Config, env: DistEnv, run_dir: Path, hosts: list[str], flops: dict | None,
                    logger: Logger) -> Observers:
    """`flops`: count_flops of the model (run.py counts it before the model moves to the device)."""
    p = cfg.parallel
    sentinel = None
    if p.hang_timeout_s and env.distributed:  # one process has no collective to hang in (and a notebook
        # or a debugger must not be killed for pausing)
        store = dist.side_store(env, timeout_s=max(2.0, min(10.0, p.hang_timeout_s / 2)))
        sentinel = HangSentinel(env.rank, env.world_size, run_dir / "hang", p.hang_timeout_s, p.init_timeout_s,
                                store=store)
    return Observers(
        guard=NanGuard(cfg.train.nan_guard, cfg.train.max_bad_steps), sentinel=sentinel,
        stats=RankStats(env.device, hosts, cfg.log.straggler_factor),
        profiler=ProfileWindow.build(cfg.profile, env.rank, env.device, run_dir,
                                     on_done=logger.log_profile if env.is_main else None),
        flops=flops, peak_tflops=peak_tflops(env.device, cfg.train.peak_tflops))


def summary_fields(obs: Observers, tflops: list[float]) -> dict:
    out: dict = {"skipped_steps": obs.guard.skipped, "rollbacks": obs.guard.rollbacks, "nan_guard": obs.guard.where,
                 "per_rank": obs.stats.table()}
    if obs.flops:
        out["flops_per_sample"] = obs.flops["train"]
        out["flops_forward_per_sample"] = obs.flops["forward"]
        if tflops:
            steady = sorted(tflops)[len(tflops) // 2]  # the median window: start-up and evals left out
            out["tflops_per_device"] = steady
            if obs.peak_tflops:
                out["mfu"] = steady / obs.peak_tflops
                out["peak_tflops"] = obs.peak_tflops
    return out
