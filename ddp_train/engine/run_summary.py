"""summary.json for run.py: the final metrics, throughput and versions of a finished run, every rank's
memory and page faults, and the wind-down's timings once the run has ended. Written by rank 0."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from ..config import Config
from ..env import DistEnv
from ..rundir import files
from .checkpointing import CheckpointManager
from .timeline import Timeline
from .trainer import Trainer

log = logging.getLogger("ddp_train")

PER_RANK_MEMORY = ("peak_rss_gb", "minor_faults_per_step", "peak_rss_growth_mb")


def add_memory(summary: dict, memory: list[dict], device: torch.device) -> None:
    """`memory`: each rank's peak_memory + page-fault counters (all_gather_object), in rank order. Rank
    0's fault figures are the headline; every rank's go into its per_rank row."""
    summary["peak_rss_gb_per_rank"] = [m["peak_rss_gb"] for m in memory]
    summary.update(minor_faults_per_step=memory[0]["minor_faults_per_step"],
                   peak_rss_growth_mb=memory[0]["peak_rss_growth_mb"])
    for row, m in zip(summary.get("per_rank", []), memory):
        row.update({k: m[k] for k in PER_RANK_MEMORY})
    if device.type == "cuda":
        summary["peak_gpu_mem_gb_per_rank"] = [m["peak_gpu_mem_gb"] for m in memory]


def record_teardown(timeline: Timeline, summary_path: Path) -> None:
    """The last step to the end (final eval, checkpoint, plots, loggers, process group): into summary.json,
    written once more now that it is known, and the log."""
    teardown = timeline.teardown()
    if not teardown or not summary_path.exists():
        return
    summary = json.loads(summary_path.read_text())
    summary.update(teardown)
    files.write_json(summary_path, summary)
    log.info("wind-down %s", Timeline.describe(teardown["teardown_s"], teardown["teardown"]))


def summarise(cfg: Config, env: DistEnv, trainer: Trainer, checkpointer: CheckpointManager, final: dict,
              started: float, steps_before: int) -> dict:
    p = trainer.progress
    trained_samples = (p.step - steps_before) * cfg.train.global_batch_size
    best = max((h["val/top1"] for h in trainer.history), default=final["top1"])
    saves = checkpointer.save_seconds
    return {"val/loss": final["loss"], "val/top1": final["top1"], "val/top5": final["top5"],
            "val/count": final["count"], "best/val_top1": best, "step": p.step, "epoch": p.epoch,
            "samples_per_s": trained_samples / max(trainer.train_time, 1e-9),
            "train_time_s": trainer.train_time, "wall_time_s": time.time() - started,
            "data_wait_frac": trainer.data_wait_s / max(trainer.train_time, 1e-9),
            "world_size": env.world_size, "backend": torch.distributed.get_backend() if env.distributed else "none",
            "strategy": cfg.parallel.strategy, "precision": cfg.train.precision,
            "global_batch_size": cfg.train.global_batch_size, "step_time_s": trainer.step_time_s(),
            "checkpoint_save_s": saves[-1] if saves else None, "checkpoint_save_max_s": max(saves, default=None),
            "checkpoint_saves": len(saves), "checkpoint_failures": checkpointer.failures,
            "world_sizes": p.world_sizes, "stopped_early": trainer.stopped_early is not None,
            **({"stopped_early_step": trainer.stopped_early["step"], "stopped_early_reason":
                trainer.stopped_early["reason"]} if trainer.stopped_early else {}),
            **{k: v for k, v in (trainer.history[-1] if trainer.history else {}).items() if k.startswith("val_ema/")},
            "git_sha": files.git_sha(), **files.versions()}
