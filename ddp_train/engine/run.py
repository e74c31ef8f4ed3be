"""The one place that assembles the pieces. Top to bottom = the data path: environment -> process group
-> run directory -> data -> model -> wrap -> optimizer -> loggers -> checkpoints/resume -> fit -> summary."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import dist
from ..allocator import fix_malloc_thresholds
from ..config import Config, micro_batch_size, total_steps
from ..data import EvalBatches, TrainBatches, load_distributed, use_device_resident
from ..data.user import object_source, user_source
from ..ending import hold_exit_code
from ..env import DistEnv, cpus_available, from_env, getenv
from ..errors import DIVERGED_EXIT, PREEMPTED_EXIT
from ..models import build_model
from ..rundir import files
from ..rundir.naming import resolve_run_dir
from ..tracking.console import setup_logging
from ..tracking.flops import count_flops
from ..tracking.loggers import ConsoleLogger, JsonlLogger, Logger, MultiLogger, NoState
from ..tracking.sysinfo import peak_memory
from ..usercode import is_import_path, source_dir
from . import sync_bn
from .best import BestCheckpoints
from .checkpointing import CheckpointManager
from .early_stop import EarlyStopping
from .ema import EMA
from .fsdp import is_fsdp, shard_model
from .loss import build_loss
from .memory_format import use_channels_last
from .nan_guard import Diverged
from .observe import build_observers, summary_fields
from .optim import build_optimizer, build_scheduler
from .parallel import wrap
from .precision import Precision, configure_backends
from .preempt import Preemption
from .run_summary import add_memory, record_teardown, summarise
from .state import LossWindow, RNGState, TrainProgress
from .timeline import Timeline
from .trainer import Preempted, Trainer

log = logging.getLogger("ddp_train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_loggers(cfg: Config, env: DistEnv, run_dir: Path) -> tuple[Logger, JsonlLogger | NoState]:
    """Rank 0's console, metrics.jsonl, W&B and TensorBoard; the do-nothing Logger elsewhere. Also the
    state that keeps metrics.jsonl in step with the checkpoints (NoState on the other ranks)."""
    if not env.is_main:
        return Logger(), NoState()
    history = JsonlLogger(run_dir / "metrics.jsonl")
    loggers: list[Logger] = [ConsoleLogger(cfg.log.console_metrics, cfg.log.straggler_factor), history]
    if cfg.log.wandb.mode != "disabled":
        from ..tracking.wandb_logger import WandbLogger

        loggers.append(WandbLogger(cfg, env, run_dir))
    if cfg.log.tensorboard:
        from ..tracking.tensorboard_logger import TensorBoardLogger

        loggers.append(TensorBoardLogger(run_dir / "tb"))
    return MultiLogger(loggers), history


@dataclass
class Components:
    """What the Python API was given instead of import paths: a model factory or module, the datasets
    (train, test) or their factory, a loss function."""
    model: Any = None
    data: Any = None
    loss: Any = None


@dataclass
class Outcome:
    exit_code: int
    run_dir: Path | None


def run(cfg: Config, config_path: str | None = None, on_preempted=None, components: Components | None = None,
        keep_exit_code: bool = False) -> int:
    """Trains `cfg` on this process's rank. Returns 0, or PREEMPTED_EXIT after the agreed preemption save
    (then `on_preempted`, if given, runs on global rank 0 before any rank returns), or DIVERGED_EXIT.
    keep_exit_code (the command line, which owns the process): once the ranks agree on a non-zero code,
    the launcher's SIGTERM for the ranks still winding down ends them with that code (ending.py)."""
    return execute(cfg, config_path, on_preempted, components, keep_exit_code).exit_code


def data_source(cfg: Config, given: Any):
    if given is None:
        return None
    if callable(given) and not isinstance(given, (tuple, list)):
        return user_source(cfg.data.name, factory=given)
    return object_source(*given)


def model_factory(given: Any):
    """A module instance becomes a factory returning it (the engine then copies rank 0's weights to
    every rank, since each rank built its own instance)."""
    if given is None or not isinstance(given, torch.nn.Module):
        return given, False
    return (lambda **_: given), True


def intra_op_threads(env: DistEnv, workers: int) -> int:
    """Unless OMP_NUM_THREADS says otherwise: the rank's share of the CPUs, less its DataLoader workers.
    torch's default (every core) oversubscribes them, and OpenMP threads that spin while a worker holds
    their core ran one process with one worker 8x slower on 2 cores (187 vs 1629 samples/s)."""
    if getenv("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = max(1, cpus_available() // max(1, env.local_world_size) - workers)
    torch.set_num_threads(threads)
    return threads


def execute(cfg: Config, config_path: str | None = None, on_preempted=None,
            components: Components | None = None, keep_exit_code: bool = False) -> Outcome:
    given = components or Components()
    started = time.time()
    timeline = Timeline()
    malloc = fix_malloc_thresholds()  # done already by `python -m ddp_train`; here for ddp_train.fit and SLURM
    env = from_env()
    micro = micro_batch_size(cfg, env.world_size)  # a user error before any collective or data work
    configure_backends(cfg.train.deterministic, cfg.train.cudnn_benchmark, cfg.train.tf32)
    dist.init(env, cfg.parallel.backend, cfg.parallel.timeout_s, cfg.parallel.init_timeout_s)
    timeline.mark("process_group")
    logger: Logger = Logger()
    preemption = Preemption(cfg.checkpoint.preempt_signals, cfg.checkpoint.simulate_preempt_at_step,
                            cfg.checkpoint.preempt_vote_every_s)
    loaders: list = []
    run_dir = None
    restore_logging = None
    obs = None
    agreed = None  # a non-zero exit code every rank reached together
    try:
        run_dir = Path(dist.decide_on_main(env, resolve_run_dir, cfg, config_path))
        restore_logging = setup_logging(env, run_dir / "train.log" if env.is_main else None)
        hosts = dist.hosts_per_rank()
        log.info("ranks per host: %s", dist.ranks_by_host(hosts))
        if env.is_main:
            (run_dir / "config.yaml").write_text(cfg.to_yaml())
        logger, history = build_loggers(cfg, env, run_dir)  # W&B starts on a thread, ready before training
        device = env.device

        # rank 0 downloads/scans, the others wait, then all open
        splits = load_distributed(env, cfg.data, data_source(cfg, given.data))
        info = splits.info
        timeline.mark("data")
        seed_everything(cfg.run.seed)  # identical model init on every rank
        factory, instance = model_factory(given.model)
        model = build_model(cfg.model, info, factory)
        flops = count_flops(model, (info.in_channels, *info.image_size))  # on a meta copy, before it moves
        model = model.to(device)
        if instance:
            dist.broadcast_module(model)
        loss_fn = build_loss(cfg.train, info.num_classes, given.loss)
        if env.is_main:  # what evaluate/export/predict need to rebuild the model without the dataset
            code = [source_dir(p) for p in (cfg.model.name, cfg.data.name, cfg.train.loss) if is_import_path(p)]
            code = list(dict.fromkeys(c for c in code if c))
            files.write_json(run_dir / "data_info.json", files.data_info(cfg.data, info, code))
        channels_last = use_channels_last(cfg.train.channels_last, model, (info.in_channels, *info.image_size),
                                          device, sharded=cfg.parallel.strategy == "fsdp" and env.distributed)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.parallel.sync_bn and env.distributed and cfg.parallel.strategy == "ddp":
            model = sync_bn.convert(model, device)
        ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        wrapped = wrap(model, cfg.parallel, cfg.train, env)
        if ema is not None and is_fsdp(model):
            ema.shard_like(lambda module: shard_model(module, cfg.train, env))
        optimizer = build_optimizer(cfg.optim, model)
        timeline.mark("model")
        seed_everything(cfg.run.seed + env.rank)  # dropout/augmentation: a different stream per rank

        resident = use_device_resident(cfg.data, splits, device)
        deaf = cfg.checkpoint.preempt_signals  # DataLoader workers ignore them: the ranks save, then stop them
        train = TrainBatches(splits.train, info, env, cfg.data, micro, cfg.train.grad_accum_steps,
                             cfg.run.seed, device, resident, channels_last, deaf)
        evals = EvalBatches(splits.test, info, env, cfg.data, cfg.train.eval_batch_size, device, resident,
                            channels_last, deaf, seed=cfg.run.seed)
        loaders += [train, evals]
        threads = intra_op_threads(env, 0 if resident else train.workers)
        total = total_steps(cfg, train.steps_per_epoch)
        scheduler = build_scheduler(cfg.sched, optimizer, cfg.optim.lr, total, train.steps_per_epoch)
        # FSDP2 casts through its policy; one process is not sharded, so it keeps autocast like DDP
        precision = Precision(cfg.train.precision, device, fsdp=cfg.parallel.strategy == "fsdp" and env.distributed)

        obs = build_observers(cfg, env, run_dir, hosts, flops, logger)
        progress, window = TrainProgress(), LossWindow(device, env.rank)
        early = EarlyStopping(cfg.train.early_stopping)
        best = BestCheckpoints(cfg.checkpoint.keep_best, cfg.checkpoint.best_metric) if cfg.checkpoint.keep_best else None
        states = {"progress": progress, "scheduler": scheduler, "scaler": precision, "early_stopping": early,
                  "nan_guard": obs.guard, "metrics_log": history}
        states.update({"ema": ema} if ema else {})
        states.update({"best": best} if best else {})
        checkpointer = CheckpointManager(
            cfg.checkpoint, run_dir / "checkpoints", env, model=model, optimizer=optimizer, states=states,
            rank_states={"rng": RNGState(device), "loss_window": window}, config=cfg.to_dict(),
            on_saved=logger.log_checkpoint, modules={"ema": ema.module} if ema else None, best=best)
        checkpointer.resume()
        progress.note_world_size(env.world_size)
        trainer = Trainer(cfg=cfg, env=env, model=model, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler,
                          precision=precision, train=train, evals=evals, num_classes=info.num_classes,
                          total_steps=total, progress=progress, window=window, logger=logger,
                          checkpointer=checkpointer, preemption=preemption, loss_fn=loss_fn, ema=ema,
                          early=early if early.enabled else None, best=best, **obs.trainer_kwargs())
        log.info("run %s | world %d (%s, %s) | device %s | data %s: %d train / %d test, %s | global batch %d = "
                 "%d ranks x %d micro x %d accum | %d steps/epoch, %d steps total | %d threads%s", run_dir,
                 env.world_size,
                 cfg.parallel.strategy, torch.distributed.get_backend() if env.distributed else "single",
                 device, cfg.data.name, len(splits.train), len(splits.test),
                 "device-resident" if resident else "DataLoader", cfg.train.global_batch_size, env.world_size,
                 micro, cfg.train.grad_accum_steps, train.steps_per_epoch, total, threads,
                 f" | resuming at step {progress.step}" if progress.step else "")

        steps_before = progress.step
        timeline.mark("resumed")
        logger.ready()
        timeline.mark("loggers")
        evals.start_workers()  # fork now: no collective running, W&B's start-up thread joined
        try:
            final = trainer.fit()
        except BaseException:
            if obs.sentinel is not None:  # W&B's finish on the way out is not a hang
                obs.sentinel.stop()
            raise
        timeline.mark("fit_done")
        for name, at in (("first_step", trainer.first_step_at), ("last_step", trainer.last_step_at)):
            if at is not None:
                timeline.mark(name, at)
        # every rank's peaks and page faults, for the summary
        memory = dist.all_gather_object({**peak_memory(device), **trainer.counters.summary()})
        if env.is_main:
            summary = summarise(cfg, env, trainer, checkpointer, final, started, steps_before)
            summary.update(hosts_per_rank=hosts, malloc=malloc, channels_last=channels_last)
            summary.update(summary_fields(obs, trainer.tflops))
            add_memory(summary, memory, device)
            summary.update(timeline.startup())
            files.write_json(run_dir / "summary.json", summary)
            if final["confusion"] is not None:
                files.write_confusion(final["confusion"], info.class_names, run_dir / "plots")
            files.write_curves(run_dir)
            logger.log_summary(summary)
            if "startup_s" in summary:
                log.info("start-up %s", Timeline.describe(summary["startup_s"], summary["startup"]))
            log.info("done: val/top1 %.4f, val/top5 %.4f, val/loss %.4f | %.0f samples/s | %.1f s wall",
                     final["top1"], final["top5"], final["loss"], summary["samples_per_s"], summary["wall_time_s"])
        timeline.mark("summary")
        logger.finish(0)
        timeline.mark("finished")
        return Outcome(0, run_dir)
    except Diverged as e:
        if env.is_main:  # every rank agreed (the norm is global): one line
            log.error("%s", e)
        logger.finish(DIVERGED_EXIT)
        agreed = DIVERGED_EXIT
        dist.barrier(patient=True)  # rank 0's W&B and log are closed before any rank exits
        return Outcome(DIVERGED_EXIT, run_dir)
    except Preempted:
        logger.finish(PREEMPTED_EXIT)
        agreed = PREEMPTED_EXIT
        if on_preempted is not None and env.is_main:
            on_preempted()  # e.g. `scontrol requeue`: before any rank exits (KillOnBadExit kills the rest)
        dist.barrier(patient=True)
        return Outcome(PREEMPTED_EXIT, run_dir)
    except BaseException:
        logger.finish(1)
        raise
    finally:
        if obs is not None and obs.sentinel is not None:
            obs.sentinel.stop()
        for batches in loaders:
            batches.close()
        preemption.restore()
        if keep_exit_code and agreed is not None:
            hold_exit_code(agreed)  # the first rank out gets the rest SIGTERMed: they end with the same code
        dist.teardown()
        if "finished" in timeline.marks and env.is_main:
            timeline.mark("end")
            record_teardown(timeline, run_dir / "summary.json")
        if restore_logging is not None:
            restore_logging()
