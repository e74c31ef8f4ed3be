"""What a checkpoint holds and when it is written: the CheckpointManager owns the save schedule (the loop
only asks `due_*` and calls `save`), assembles the full train state (model, optimizer, scheduler,
scaler, progress, every rank's RNG states, W&B id, config) and restores it for an exact resume."""
from __future__ import annotations

import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from . import dist, model_state
from .config import CheckpointConfig, flatten
from .dist import DistEnv
from .errors import CheckpointError
from .fsdp import is_fsdp

log = logging.getLogger("ddp_train")


def rng_state(device: torch.device, augment=None) -> dict[str, Any]:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if augment is not None:
        state["augment"] = augment.state().cpu()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device, augment=None) -> None:
    if augment is not None and "augment" in state:
        augment.set_state(state["augment"])
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, directory: Path, env: DistEnv, config: dict, logger=None):
        self.cfg, self.directory, self.env, self.config = cfg, directory, env, config
        self.logger = logger
        self.wandb_run_id: str | None = None
        self.last_saved_step: int | None = None
        self.save_seconds: list[float] = []
        self.failures = 0
        self._warned_budget = False

    def due_step(self, step: int) -> bool:
        return bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0

    def due_epoch(self, epoch: int) -> bool:
        return bool(self.cfg.every_epochs) and epoch % self.cfg.every_epochs == 0

    # ----------------------------------------------------------------------------------------- save
    def save(self, trainer, reason: str) -> Path | None:
        """Collective: every rank calls it (RNG states are gathered); rank 0 writes the file."""
        step = trainer.progress.step
        if step == self.last_saved_step:
            return None
        start = time.perf_counter()
        per_rank = dist.all_gather_object((rng_state(self.env.device, trainer.train.augment), trainer.window_state()))
        rngs, windows = [r for r, _ in per_rank], [w for _, w in per_rank]
        fsdp = is_fsdp(trainer.model)
        model_sd, optim_sd = {}, {}
        if fsdp or self.env.is_main:  # a collective under FSDP; under DDP only the writer needs the copy
            model_sd, optim_sd = model_state.consolidated(trainer.model, trainer.optimizer)
        sharded = self._save_sharded(trainer, step) if fsdp else None
        path = None
        if self.env.is_main:
            state = {"format": ckpt.FORMAT_VERSION, "model": model_sd, "optimizer": optim_sd,
                     "scheduler": trainer.scheduler.state_dict(),
                     "scaler": trainer.precision.scaler.state_dict(), "progress": trainer.progress_dict(),
                     "rng": rngs, "wandb_run_id": self.wandb_run_id, "config": self.config,
                     "extra": {"reason": reason, "world_size": self.env.world_size, "time": time.time(),
                               "loss_window": windows, "sharded": sharded}}
            if reason == "preempt" and self.cfg.simulate_slow_save_s:
                time.sleep(self.cfg.simulate_slow_save_s)  # fault injection: a save as slow as a large model's
            try:
                path = ckpt.write_checkpoint(self.directory, step, state)
                ckpt.prune(self.directory, self.cfg.keep_last)
            except OSError as e:
                self.failures += 1
                previous = ckpt.list_checkpoints(self.directory)
                log.error("checkpoint save at step %d failed: %s; earlier checkpoints are untouched (newest: %s)",
                          step, e, previous[0] if previous else "none")
                path = None
        # Nobody leaves before the file is complete: a launcher may kill rank 0 once another rank exits.
        # The wait is bounded by parallel.init_timeout_s, not the training timeout: a large save may be slow.
        dist.barrier(patient=True)
        self.last_saved_step = step
        if path is not None:
            self.save_seconds.append(time.perf_counter() - start)
            log.info("saved checkpoint %s (%s, %.2f s)", path, reason, self.save_seconds[-1])
            self._check_shutdown_budget(self.save_seconds[-1], trainer.step_time_s())
            if self.logger is not None:
                self.logger.log_checkpoint(path, step)
        return path

    def _check_shutdown_budget(self, save_s: float, step_s: float) -> None:
        """torchrun SIGKILLs its workers a fixed time after forwarding SIGTERM: say so once if a preemption
        save (one step to reach the boundary, then the save) would not fit."""
        budget = dist.agent_shutdown_timeout()
        if budget is None or self._warned_budget or save_s + step_s < 0.8 * budget:
            return
        self._warned_budget = True
        log.warning("a preemption save needs about %.0f s (save %.1f s + a step %.1f s) but torchrun kills the "
                    "workers %.0f s after SIGTERM: launch with ddp-train (parallel.shutdown_timeout_s) or "
                    "torchrun --shutdown-timeout %d, or export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=%d",
                    save_s + step_s, save_s, step_s, budget, int(2 * (save_s + step_s)) + 10,
                    int(2 * (save_s + step_s)) + 10)

    def _save_sharded(self, trainer, step: int) -> str | None:
        """FSDP: torch.distributed.checkpoint, one file per rank, written to a temp dir and renamed when
        every rank is done. Returns its name for the manifest, or None when it failed (the consolidated
        file is still written, so nothing is lost but the fast path)."""
        final = self.directory / f"step_{step:08d}.dcp"
        tmp = final.with_name(final.name + ".tmp")
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        try:
            model_state.save_sharded(trainer.model, trainer.optimizer, tmp)
        except Exception as e:  # DCP raises on every rank alike when one rank failed to write
            log.error("sharded checkpoint at step %d failed (%s); keeping the consolidated one only", step, e)
            return None
        dist.barrier(patient=True)
        if self.env.is_main:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        return final.name

    # --------------------------------------------------------------------------------------- resume
    def _choose(self, fsdp: bool) -> tuple[str, str | None] | None:
        """(checkpoint, its sharded directory when this job resumes from the shards): decided on rank 0 and
        shared, so no rank takes the other path because a shared filesystem showed it a directory late."""
        mode = self.cfg.resume
        if mode == "never":
            return None
        if mode == "auto":
            path = ckpt.newest_valid(self.directory)
            if path is None:
                return None
        else:
            path = Path(mode)
            if not path.is_file():
                raise CheckpointError(f"checkpoint.resume={mode}: no such file (use auto, never or a checkpoint path)")
            problem = ckpt.verify(path) if path.with_suffix(".json").exists() else None
            if problem:
                raise CheckpointError(f"checkpoint.resume={mode}: {problem}")
        sharded = None
        if fsdp:
            extra = ckpt.read_checkpoint(path, mmap=True).get("extra") or {}  # reads only this
            shards = path.parent / extra["sharded"] if extra.get("sharded") else None
            if shards is not None and shards.is_dir() and extra.get("world_size") == self.env.world_size:
                sharded = str(shards)
        return str(path), sharded

    def resume(self, trainer) -> Path | None:
        """Restores the newest good checkpoint (or the configured one) on every rank; all ranks must
        end on the same step. Returns the path, or None for a fresh start."""
        # also waits for the slowest rank to get here
        chosen = dist.decide_on_main(self.env, self._choose, is_fsdp(trainer.model))
        if chosen is None:
            return None
        start = time.perf_counter()  # the load itself, not the wait for the other ranks
        path, sharded = Path(chosen[0]), chosen[1] and Path(chosen[1])
        fast = sharded is not None
        # mmap: an FSDP resume from its shards never reads the full tensors. Everything kept beyond this
        # function is copied out, so no pruned file stays mapped (on NFS: .nfsXXXX files that never go).
        state = ckpt.read_checkpoint(path, mmap=fast)
        extra = state.get("extra") or {}
        try:
            if fast:  # every rank reads its own shard; nothing is gathered
                model_state.load_sharded(trainer.model, trainer.optimizer, sharded)
            else:  # the consolidated form: also how DDP and FSDP runs resume from each other
                model_state.load_consolidated(trainer.model, trainer.optimizer, state["model"], state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path} does not fit this model: {_key_problem(str(e))}") from None
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.precision.scaler.load_state_dict(state["scaler"])
        trainer.load_progress(state["progress"])
        rngs = state["rng"]
        if self.env.rank < len(rngs) and len(rngs) == self.env.world_size:
            set_rng_state(rngs[self.env.rank], self.env.device, trainer.train.augment)
            windows = extra.get("loss_window")
            if windows and len(windows) == self.env.world_size:
                trainer.set_window_state(windows[self.env.rank])
        else:
            log.warning("checkpoint was written by %d ranks, this job has %d: RNG streams restart (dropout "
                        "and augmentation draws will differ from an uninterrupted run)", len(rngs),
                        self.env.world_size)
        self.wandb_run_id = state.get("wandb_run_id")
        steps = dist.all_gather_object(trainer.progress.step)
        if len(set(steps)) != 1:
            raise CheckpointError(f"ranks resumed from different steps {steps}: is {self.directory} on a "
                                  "filesystem every node sees?")
        self.last_saved_step = trainer.progress.step
        _warn_config_changes(state.get("config") or {}, self.config)
        log.info("resumed from %s%s at step %d (epoch %d, step %d in epoch) in %.2f s", path,
                 f" (sharded: {sharded.name})" if fast else "",
                 trainer.progress.step, trainer.progress.epoch, trainer.progress.step_in_epoch,
                 time.perf_counter() - start)
        return path


def _key_problem(msg: str) -> str:
    lines = [ln.strip() for ln in msg.splitlines() if "Missing key" in ln or "Unexpected key" in ln
             or "size mismatch" in ln]
    return "; ".join(lines)[:600] or msg.splitlines()[0][:300]


def _warn_config_changes(old: dict, new: dict) -> None:
    a, b = flatten(old), flatten(new)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
               and not k.startswith(("checkpoint.", "run.", "log."))]
    if changed:
        log.warning("resuming with a different config for %s: the run will not match an uninterrupted one",
                    ", ".join(changed))
