"""The one place that assembles the pieces. Top to bottom = the data path: environment -> process group
-> run directory -> data -> model -> wrap -> optimizer -> loggers -> resume -> fit -> summary."""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from . import artifacts, dist
from .config import Config
from .data import EvalBatches, TrainBatches, use_device_resident
from .datasets import load_distributed
from .dist import DistEnv
from .errors import ConfigError
from .loggers import ConsoleLogger, JsonlLogger, Logger, MultiLogger, setup_logging
from .models import build_model
from .optim import build_optimizer, build_scheduler
from .parallel import wrap
from .precision import Precision, configure_backends
from .preempt import PREEMPTED_EXIT, PreemptionFlag
from .sysinfo import peak_memory
from .train_state import CheckpointManager
from .trainer import Preempted, Trainer

log = logging.getLogger("ddp_train")


def micro_batch_size(cfg: Config, env: DistEnv) -> int:
    """Batch size is global: per-rank micro-batch = global / (world x grad_accum)."""
    t = cfg.train
    parts = env.world_size * t.grad_accum_steps
    if t.global_batch_size % parts:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} does not divide by world size "
                          f"{env.world_size} x train.grad_accum_steps {t.grad_accum_steps}: use a multiple of "
                          f"{parts}")
    return t.global_batch_size // parts


def default_run_name(config_path: str | None, launch: str | None) -> str:
    """<config stem>-<launch id>; the SLURM launcher predicts its jobs' directories with this too."""
    stem = Path(config_path).stem if config_path else "default"
    return f"{stem}-{launch or time.strftime('%Y%m%d-%H%M%S')}"


def resolve_run_dir(cfg: Config, config_path: str | None) -> str:
    """Rank 0 names the run. Unnamed runs get <config>-<launch id>: SLURM's job id or the torchrun agent's
    start time, both kept across requeues/restarts, so those continue the same directory."""
    root = Path(cfg.run.root)
    name = cfg.run.name
    if name is None:
        launch = dist.launch_id()
        name = default_run_name(config_path, launch)
        fresh = launch is None or (not launch.startswith("job") and dist.restart_count() == 0)
        base, n = name, 1
        while fresh and (root / name).exists():  # two launches in the same second
            name, n = f"{base}-{n}", n + 1
    run_dir = root / name
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.root={cfg.run.root}: cannot write the run directory {run_dir} ({e.strerror}); "
                          "choose a writable run.root") from None
    return str(run_dir)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_loggers(cfg: Config, env: DistEnv, run_dir: Path) -> tuple[Logger, str | None]:
    """(logger, W&B run id). Rank 0 only; the W&B id is None when W&B is off."""
    if not env.is_main:
        return Logger(), None
    loggers: list[Logger] = [ConsoleLogger(), JsonlLogger(run_dir / "metrics.jsonl")]
    wandb_id = None
    if cfg.log.wandb.mode != "disabled":
        from .wandb_logger import WandbLogger

        wb = WandbLogger(cfg, env, run_dir)
        loggers.append(wb)
        wandb_id = getattr(wb, "run_id", None)
    return MultiLogger(loggers), wandb_id


def run(cfg: Config, config_path: str | None = None, on_preempted=None) -> int:
    """Trains `cfg` on this process's rank. Returns 0, or PREEMPTED_EXIT after the agreed preemption save
    (then `on_preempted`, if given, runs on global rank 0 before any rank returns)."""
    started = time.time()
    env = dist.from_env()
    micro = micro_batch_size(cfg, env)  # a user error before any collective or data work
    configure_backends(cfg.train.deterministic, cfg.train.cudnn_benchmark, cfg.train.tf32)
    dist.init(env, cfg.parallel.backend, cfg.parallel.timeout_s, cfg.parallel.init_timeout_s)
    logger: Logger = Logger()
    preemption = PreemptionFlag(cfg.checkpoint.preempt_signals)
    loaders: list = []
    try:
        run_dir = Path(dist.decide_on_main(env, resolve_run_dir, cfg, config_path))
        setup_logging(env.is_main, run_dir / "train.log" if env.is_main else None)
        if env.is_main:
            (run_dir / "config.yaml").write_text(cfg.to_yaml())
        device = env.device

        splits = load_distributed(env, cfg.data)  # rank 0 downloads/scans, the others wait, then all open
        info = splits.info
        if env.is_main:  # what evaluate/export/predict need to rebuild the model without the dataset
            artifacts.write_json(run_dir / "data_info.json", artifacts.data_info(cfg.data, info))
        seed_everything(cfg.run.seed)  # identical model init on every rank
        model = build_model(cfg.model, info).to(device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        wrapped = wrap(model, cfg.parallel, cfg.train, env)
        optimizer = build_optimizer(cfg.optim, model)
        seed_everything(cfg.run.seed + env.rank)  # dropout/augmentation: a different stream per rank

        resident = use_device_resident(cfg.data, splits, device)
        deaf = cfg.checkpoint.preempt_signals  # DataLoader workers ignore them: the ranks save, then stop them
        train = TrainBatches(splits.train, info, env, cfg.data, micro, cfg.train.grad_accum_steps,
                             cfg.run.seed, device, resident, cfg.train.channels_last, deaf)
        evals = EvalBatches(splits.test, info, env, cfg.data, cfg.train.eval_batch_size, device, resident,
                            cfg.train.channels_last, deaf)
        loaders += [train, evals]
        total = cfg.train.epochs * train.steps_per_epoch
        total = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
        scheduler = build_scheduler(cfg.sched, optimizer, cfg.optim.lr, total, train.steps_per_epoch)
        # FSDP2 casts through its policy; one process is not sharded, so it keeps autocast like DDP
        precision = Precision(cfg.train.precision, device, fsdp=cfg.parallel.strategy == "fsdp" and env.distributed)

        logger, wandb_id = build_loggers(cfg, env, run_dir)
        checkpointer = CheckpointManager(cfg.checkpoint, run_dir / "checkpoints", env, cfg.to_dict(), logger)
        checkpointer.wandb_run_id = wandb_id
        trainer = Trainer(cfg, env, model, wrapped, optimizer, scheduler, precision, train, evals,
                          info.num_classes, logger, checkpointer, preemption)
        checkpointer.resume(trainer)
        log.info("run %s | world %d (%s, %s) | device %s | data %s: %d train / %d test, %s | global batch %d = "
                 "%d ranks x %d micro x %d accum | %d steps/epoch, %d steps total%s", run_dir, env.world_size,
                 cfg.parallel.strategy, torch.distributed.get_backend() if env.distributed else "single",
                 device, cfg.data.name, len(splits.train), len(splits.test),
                 "device-resident" if resident else "DataLoader", cfg.train.global_batch_size, env.world_size,
                 micro, cfg.train.grad_accum_steps, train.steps_per_epoch, trainer.total_steps,
                 f" | resuming at step {trainer.progress.step}" if trainer.progress.step else "")

        steps_before = trainer.progress.step
        final = trainer.fit()
        memory = dist.all_gather_object(peak_memory(device))  # every rank's peaks, for the summary
        if env.is_main:
            summary = summarise(cfg, env, trainer, final, started, steps_before)
            summary["peak_rss_gb_per_rank"] = [m["peak_rss_gb"] for m in memory]
            if device.type == "cuda":
                summary["peak_gpu_mem_gb_per_rank"] = [m["peak_gpu_mem_gb"] for m in memory]
            artifacts.write_json(run_dir / "summary.json", summary)
            if final["confusion"] is not None:
                artifacts.write_confusion(final["confusion"], info.class_names, run_dir / "plots")
            artifacts.write_curves(run_dir)
            logger.log_summary(summary)
            log.info("done: val/top1 %.4f, val/top5 %.4f, val/loss %.4f | %.0f samples/s | %.1f s wall",
                     final["top1"], final["top5"], final["loss"], summary["samples_per_s"], summary["wall_time_s"])
        logger.finish(0)
        return 0
    except Preempted:
        logger.finish(PREEMPTED_EXIT)
        if on_preempted is not None and env.is_main:
            on_preempted()  # e.g. `scontrol requeue`: before any rank exits (KillOnBadExit kills the rest)
        dist.barrier(patient=True)
        return PREEMPTED_EXIT
    except BaseException:
        logger.finish(1)
        raise
    finally:
        for batches in loaders:
            batches.close()
        preemption.restore()
        dist.teardown()


def summarise(cfg: Config, env: DistEnv, trainer: Trainer, final: dict, started: float, steps_before: int) -> dict:
    trained_samples = (trainer.progress.step - steps_before) * cfg.train.global_batch_size
    best = max((h["val/top1"] for h in trainer.history), default=final["top1"])
    saves = trainer.checkpointer.save_seconds
    return {"val/loss": final["loss"], "val/top1": final["top1"], "val/top5": final["top5"],
            "val/count": final["count"], "best/val_top1": best, "step": trainer.progress.step,
            "epoch": trainer.progress.epoch, "samples_per_s": trained_samples / max(trainer.train_time, 1e-9),
            "train_time_s": trainer.train_time, "wall_time_s": time.time() - started,
            "data_wait_frac": trainer.data_wait_s / max(trainer.train_time, 1e-9),
            "world_size": env.world_size, "backend": torch.distributed.get_backend() if env.distributed else "none",
            "strategy": cfg.parallel.strategy, "precision": cfg.train.precision,
            "global_batch_size": cfg.train.global_batch_size, "step_time_s": trainer.step_time_s(),
            "checkpoint_save_s": saves[-1] if saves else None, "checkpoint_save_max_s": max(saves, default=None),
            "checkpoint_saves": len(saves),
            "checkpoint_failures": trainer.checkpointer.failures, "git_sha": artifacts.git_sha(),
            **artifacts.versions()}
