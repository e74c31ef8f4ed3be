"""When a checkpoint is written and what goes in it. The CheckpointManager is built with the model and
optimizer (saved in the consolidated form every strategy reads, plus DCP shards under FSDP) and two
mappings of named stateful objects: `states` (one per job: progress, scheduler, precision) and
`rank_states` (one per rank, gathered into a list: RNG, loss window, batches). It owns the schedule (the
loop asks `due_*`) and never reads the trainer (torchtitan's CheckpointManager(states=...), Fabric's
save(path, state))."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from .. import dist
from ..config import CheckpointConfig
from ..config.changes import config_changes
from ..env import DistEnv, agent_shutdown_timeout
from ..errors import CheckpointError
from ..rundir import checkpoints as ckpt
from . import model_state
from .best import BestCheckpoints
from .fsdp import is_fsdp
from .state import Stateful

log = logging.getLogger("ddp_train")
# States added after checkpoint format 2 was fixed: a checkpoint without them still loads.
OPTIONAL_STATES = {"early_stopping", "nan_guard", "metrics_log"}


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, directory: Path, env: DistEnv, *, model, optimizer,
                 states: dict[str, Stateful], rank_states: dict[str, Stateful], config: dict, on_saved=None,
                 modules: dict | None = None, best: BestCheckpoints | None = None):
        """`modules`: further modules saved like the model (consolidated, and sharded under FSDP), e.g. the
        EMA copy; `best`: the keep_best tracker whose steps pruning must spare."""
        clash = set(states) & (ckpt.RESERVED_KEYS | {"per_rank", "modules"})
        if clash:
            raise ValueError(f"state names {sorted(clash)} are reserved by the checkpoint layout")
        self.cfg, self.directory, self.env, self.config = cfg, directory, env, config
        self.model, self.optimizer = model, optimizer
        self.states, self.rank_states = states, rank_states
        self.modules, self.best = modules or {}, best
        self.on_saved = on_saved  # (path, step): e.g. the W&B artifact
        self.last_saved_step: int | None = None
        self.save_seconds: list[float] = []
        self.failures = 0
        self._warned_budget = False
        self.hold_before: int | None = None  # the NaN guard's streak start: keep the newest checkpoint before it

    @property
    def keys(self) -> set[str]:
        """The top-level keys of this job's checkpoints."""
        return ckpt.RESERVED_KEYS | {"per_rank"} | set(self.states) | ({"modules"} if self.modules else set())

    def due_step(self, step: int) -> bool:
        return bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0

    def due_epoch(self, epoch: int) -> bool:
        return bool(self.cfg.every_epochs) and epoch % self.cfg.every_epochs == 0

    # ----------------------------------------------------------------------------------------- save
    def save(self, step: int, reason: str, step_time_s: float = 0.0) -> Path | None:
        """Collective: every rank calls it (the per-rank states are gathered); rank 0 writes the file."""
        if step == self.last_saved_step:  # e.g. the step save came before this step's evaluation made it best
            if self.env.is_main and self.best is not None:
                try:
                    self._prune_and_point()
                except OSError as e:
                    log.error("checkpoints: could not prune or update %s: %s", ckpt.BEST_FILE, e)
            return None
        start = time.perf_counter()
        per_rank = dist.all_gather_object({name: s.state_dict() for name, s in self.rank_states.items()})
        fsdp = is_fsdp(self.model)
        model_sd, optim_sd = {}, {}
        modules_sd = {}
        if fsdp or self.env.is_main:  # a collective under FSDP; under DDP only the writer needs the copy
            model_sd, optim_sd = model_state.consolidated(self.model, self.optimizer)
            modules_sd = {name: model_state.module_state(m) for name, m in self.modules.items()}
        sharded = self._save_sharded(step) if fsdp else None
        path = None
        if self.env.is_main:
            state = {"format": ckpt.FORMAT_VERSION, "model": model_sd, "optimizer": optim_sd,
                     **{name: s.state_dict() for name, s in self.states.items()}, "per_rank": per_rank,
                     **({"modules": modules_sd} if self.modules else {}),
                     "config": self.config, "extra": {"step": step, "reason": reason, "world_size": self.env.world_size,
                                                      "time": time.time(), "sharded": sharded}}
            if reason == "preempt" and self.cfg.simulate_slow_save_s:
                time.sleep(self.cfg.simulate_slow_save_s)  # fault injection: a save as slow as a large model's
            path = self._write(step, state)
        # Nobody leaves before the file is complete: a launcher may kill rank 0 once another rank exits.
        # The wait is bounded by parallel.init_timeout_s, not the training timeout: a large save may be slow.
        dist.barrier(patient=True)
        self.last_saved_step = step
        if path is not None:
            self.save_seconds.append(time.perf_counter() - start)
            log.info("saved checkpoint %s (%s, %.2f s)", path, reason, self.save_seconds[-1])
            self._check_shutdown_budget(self.save_seconds[-1], step_time_s)
            if self.on_saved is not None:
                self.on_saved(path, step)
        return path

    def _write(self, step: int, state: dict) -> Path | None:
        try:
            path = ckpt.write_checkpoint(self.directory, step, state)
            self._prune_and_point()
            return path
        except OSError as e:
            self.failures += 1
            previous = ckpt.list_checkpoints(self.directory)
            log.error("checkpoint save at step %d failed: %s; earlier checkpoints are untouched (newest: %s)",
                      step, e, previous[0] if previous else "none")
            return None

    def _prune_and_point(self) -> None:
        """Rank 0: keep the newest keep_last, the keep_best best and, during a NaN streak, the newest from
        before it; best.json names the best kept one (rewritten whenever the ranking may have changed)."""
        protect = set(self.best.steps()) if self.best is not None else set()
        if self.hold_before is not None:
            older = [ckpt.step_of(p) for p in ckpt.list_checkpoints(self.directory)
                     if ckpt.step_of(p) < self.hold_before]
            protect |= set(older[:1])  # newest first
        ckpt.prune(self.directory, self.cfg.keep_last, protect)
        if self.best is not None:
            self.best.write_pointer(self.directory)

    def _check_shutdown_budget(self, save_s: float, step_s: float) -> None:
        """torchrun SIGKILLs its workers a fixed time after forwarding SIGTERM: say so once if a preemption
        save (one step to reach the boundary, then the save) would not fit."""
        budget = agent_shutdown_timeout()
        if budget is None or self._warned_budget or save_s + step_s < 0.8 * budget:
            return
        self._warned_budget = True
        advice = int(2 * (save_s + step_s)) + 10
        log.warning("a preemption save needs about %.0f s (save %.1f s + a step %.1f s) but torchrun kills the "
                    "workers %.0f s after SIGTERM: launch with ddp-train (parallel.shutdown_timeout_s) or "
                    "torchrun --shutdown-timeout %d, or export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=%d",
                    save_s + step_s, save_s, step_s, budget, advice, advice)

    def _save_sharded(self, step: int) -> str | None:
        """FSDP: torch.distributed.checkpoint, one file per rank, written to a temp dir and renamed when
        every rank is done. Returns its name for the manifest, or None when it failed (the consolidated
        file is still written, so nothing is lost but the fast path)."""
        final = self.directory / f"step_{step:08d}.dcp"
        tmp = final.with_name(final.name + ".tmp")
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        try:
            model_state.save_sharded(self.model, self.optimizer, tmp, self.modules)
        except Exception as e:  # DCP raises on every rank alike when one rank failed to write
            log.error("sharded checkpoint at step %d failed (%s); keeping the consolidated one only", step, e)
            return None
        dist.barrier(patient=True)
        if self.env.is_main:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        return final.name

    # --------------------------------------------------------------------------------------- resume
    def _choose(self, fsdp: bool, mode: str | None = None, before: int | None = None) -> tuple[str, str | None] | None:
        """(checkpoint, its sharded directory when this job resumes from the shards): decided on rank 0 and
        shared, so no rank takes the other path because a shared filesystem showed it a directory late."""
        mode = mode or self.cfg.resume
        if mode == "never":
            return None
        if mode == "auto":
            path = ckpt.newest_valid(self.directory, before)
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
            extra = ckpt.read_checkpoint(path, mmap=True).get("extra") or {}  # mmap: reads only this
            shards = path.parent / extra["sharded"] if extra.get("sharded") else None
            if shards is not None and shards.is_dir() and extra.get("world_size") == self.env.world_size:
                sharded = str(shards)
        return str(path), sharded

    def rollback(self, before: int) -> Path | None:
        """The NaN guard's way back: the newest intact checkpoint of this run older than step `before`,
        whatever checkpoint.resume says."""
        return self.resume(mode="auto", before=before)

    def resume(self, mode: str | None = None, before: int | None = None) -> Path | None:
        """Restores the newest good checkpoint (or the configured one) on every rank; all ranks must
        end on the same step. Returns the path, or None for a fresh start."""
        chosen = dist.decide_on_main(self.env, self._choose, is_fsdp(self.model), mode, before)  # waits for the slowest
        if chosen is None:
            return None
        start = time.perf_counter()  # the load itself, not the wait for the other ranks
        path, sharded = Path(chosen[0]), chosen[1] and Path(chosen[1])
        # mmap only for the shards' path, which never reads the full tensors: optimizer.load_state_dict
        # keeps CPU tensors as given, and a mapped file stays mapped after pruning (NFS: .nfsXXXX files).
        state = ckpt.read_checkpoint(path, expected=self.keys, mmap=sharded is not None, optional=OPTIONAL_STATES)
        try:
            if sharded is not None:  # every rank reads its own shard; nothing is gathered
                model_state.load_sharded(self.model, self.optimizer, sharded, self.modules)
            else:  # the consolidated form: also how DDP and FSDP runs resume from each other
                model_state.load_consolidated(self.model, self.optimizer, state["model"], state["optimizer"])
                for name, m in self.modules.items():
                    model_state.load_module_state(m, state["modules"][name])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path} does not fit this model: {_key_problem(str(e))}") from None
        for name, s in self.states.items():
            if name in state:  # an optional state a checkpoint of an earlier version lacks keeps its start
                s.load_state_dict(state[name])
        self._load_rank_states(state["per_rank"])
        step = int(state["extra"]["step"])
        steps = dist.all_gather_object(step)
        if len(set(steps)) != 1:
            raise CheckpointError(f"ranks resumed from different steps {steps}: is {self.directory} on a "
                                  "filesystem every node sees?")
        self.last_saved_step = step
        _warn_config_changes(state.get("config") or {}, self.config, self.model)
        log.info("resumed from %s%s at step %d in %.2f s", path, f" (sharded: {sharded.name})" if sharded else "",
                 step, time.perf_counter() - start)
        return path


    def _load_rank_states(self, per_rank: list[dict]) -> None:
        """Each rank its own states; after a change of world size, the states that can be carried over
        (the loss window) are, and the per-rank random streams restart."""
        if len(per_rank) == self.env.world_size:
            for name, s in self.rank_states.items():
                if name in per_rank[self.env.rank]:
                    s.load_state_dict(per_rank[self.env.rank][name])
            return
        for name, s in self.rank_states.items():
            saved = [r[name] for r in per_rank if name in r]
            if saved and hasattr(s, "load_from_other_world"):
                s.load_from_other_world(saved)
        dropout = any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in self.model.modules())
        (log.warning if dropout else log.info)(
            "checkpoint was written by %d ranks, this job has %d%s", len(per_rank), self.env.world_size,
            ": dropout draws per rank restart, so the run leaves the uninterrupted trajectory" if dropout else
            ": the run continues the same trajectory (augmentation is keyed per sample)")


def _key_problem(msg: str) -> str:
    lines = [ln.strip() for ln in msg.splitlines() if "Missing key" in ln or "Unexpected key" in ln
             or "size mismatch" in ln]
    return "; ".join(lines)[:600] or msg.splitlines()[0][:300]


def _warn_config_changes(old: dict, new: dict, model: torch.nn.Module) -> None:
    batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    altering, keeping = config_changes(old, new, batch_norm)
    if altering:
        log.warning("resuming with a different config for %s: the run will not match an uninterrupted one",
                    ", ".join(altering))
    if keeping:
        log.info("resuming with %s changed: the same trajectory (up to reduction order)", ", ".join(keeping))
