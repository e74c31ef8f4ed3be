"""The step loop. train_step() is one optimizer step over one global batch (micro-batches, gradient sync on
the last one, clip, step); fit() repeats it and logs, evaluates and checkpoints when due. Losses stay on
the device between log steps, so there is no host-device sync per step."""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from .. import dist
from ..config import Config
from ..data import EvalBatches, TrainBatches
from ..env import DistEnv
from ..tracking.loggers import Logger
from ..tracking.profiling import ProfileWindow
from ..tracking.progress import Progress
from ..tracking.rank_stats import RankStats
from ..tracking.sysinfo import ProcessCounters
from .best import BestCheckpoints
from .checkpointing import CheckpointManager
from .early_stop import EarlyStopping
from .ema import EMA
from .evaluation import evaluate
from .loss import CrossEntropy, LossFn
from .nan_guard import (
    DeferredVerdicts,
    Diverged,
    GradNorm,
    NanGuard,
    device_verdicts_possible,
    spans,
    step_with_flag,
)
from .parallel import grad_sync
from .precision import Precision
from .preempt import Preemption
from .sentinel import HangSentinel
from .state import LossWindow, TrainProgress
from .train_metrics import perf_metrics, window_metrics

log = logging.getLogger("ddp_train")
WARM_STEPS = 2  # start-up, resume and the first (compiling) step run under parallel.init_timeout_s
PACE_STEPS = 8  # steps timed after warming up, to space the preemption votes


class Preempted(Exception):
    """Raised after the agreed preemption save; run.py turns it into PREEMPTED_EXIT."""


class Trainer:
    def __init__(self, *, cfg: Config, env: DistEnv, model: nn.Module, wrapped: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler, precision: Precision, train: TrainBatches,
                 evals: EvalBatches, num_classes: int, total_steps: int, progress: TrainProgress,
                 window: LossWindow, logger: Logger, checkpointer: CheckpointManager, preemption: Preemption,
                 loss_fn: LossFn, ema: EMA | None = None, early: EarlyStopping | None = None,
                 best: BestCheckpoints | None = None, guard: NanGuard | None = None,
                 sentinel: HangSentinel | None = None, stats: RankStats | None = None,
                 profiler: ProfileWindow | None = None, flops: dict | None = None, peak_tflops: float | None = None):
        self.cfg, self.env, self.device = cfg, env, env.device
        self.model, self.wrapped = model, wrapped  # `model` is unwrapped: state_dicts and evaluation
        self.optimizer, self.scheduler, self.precision = optimizer, scheduler, precision
        self.train, self.evals, self.num_classes, self.total_steps = train, evals, num_classes, total_steps
        self.progress, self.window = progress, window
        self.logger, self.checkpointer, self.preemption = logger, checkpointer, preemption
        self.loss_fn = loss_fn
        self.ema, self.early, self.best = ema, early, best
        self.guard = guard or NanGuard(False, 1)
        self.grad_norm = GradNorm(wrapped)
        self._device_verdicts = device_verdicts_possible(optimizer, precision.scaler.is_enabled())
        self.verdicts = DeferredVerdicts()  # the guard's flags not read yet (device verdicts only)
        if self.guard.enabled and self._device_verdicts:
            self.guard.where = "device"
        self.sentinel, self.stats, self.profiler = sentinel, stats, profiler
        self.flops, self.peak_tflops = flops, peak_tflops
        self.tflops: list[float] = []  # per log window, for the summary
        self.stopped_early: dict | None = None  # {"step", "reason"} once early stopping ends the run
        # evaluation reports plain cross-entropy (no label smoothing) unless the loss is the user's own
        self._eval_loss = None if isinstance(loss_fn, CrossEntropy) else loss_fn
        self.history: list[dict] = []  # eval results, for the summary
        self.train_time = 0.0
        self.data_wait_s = 0.0  # host time spent waiting for the next batch: in total, and this log window
        self._window_wait_s = 0.0
        self._fit_start: float | None = None
        self._first_step = 0
        self.counters = ProcessCounters()  # minor faults and RSS growth per log window
        self.first_step_at: float | None = None  # wall clock, for the start-up / wind-down split
        self.last_step_at: float | None = None
        self._bar: Progress | None = None  # fit()'s, fed the logged train/loss

    # ---------------------------------------------------------------------------------------- step
    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple:
        """One optimizer step over one global batch; returns this rank's loss and top-1 hits, still on the
        device, the samples scored (soft mixup/CutMix targets score none: that is not accuracy), and
        whether the step was applied: True/False (False: the NaN guard found a non-finite gradient norm,
        read on the host), or the guard's device flag (1.0: skipped on the device; read later)."""
        accum = len(micro_batches)
        loss_sum = correct = None
        scored = 0
        for i, (x, y) in enumerate(micro_batches):
            with grad_sync(self.wrapped, i == accum - 1), self.precision.autocast():
                timed = self.stats.forward_started() if self.stats else None
                logits = self.wrapped(x)
                loss = self.loss_fn(logits.float(), y)
                if self.stats:
                    self.stats.forward_done(timed)
                self.precision.scaler.scale(loss / accum).backward()
            part = loss.detach() / accum if accum > 1 else loss.detach()
            loss_sum = part if loss_sum is None else loss_sum + part
            if y.dim() == 1:
                hits = (logits.detach().argmax(1) == y).sum()
                correct = hits if correct is None else correct + hits
                scored += len(y)
        scaler, clip = self.precision.scaler, self.cfg.train.grad_clip
        applied = True
        if clip is not None or self.guard.enabled:
            scaler.unscale_(self.optimizer)  # clip true gradients, not loss-scaled ones
            norm = self.grad_norm(clip)
        if self.guard.enabled and self._device_verdicts:
            applied = step_with_flag(self.optimizer, scaler.step, norm)  # no host sync
        else:
            # the same on every rank. fp16: an overflow is GradScaler's routine (it skips the step and
            # halves the scale); only once the scale fell below 1 is a non-finite norm the model's
            applied = not self.guard.enabled or self.guard.finite(norm) or (
                scaler.is_enabled() and scaler.get_scale() >= 1.0)
            if applied:
                scaler.step(self.optimizer)
        scaler.update()  # fp16: a skipped step lowers the loss scale, as GradScaler's own skip does
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None and applied is not False:
            self.ema.update(self.model, applied if isinstance(applied, torch.Tensor) else None)
        return loss_sum, correct, scored, applied

    # ----------------------------------------------------------------------------------------- fit
    def fit(self) -> dict:
        p, t = self.progress, self.cfg.train
        bar = self._bar = Progress(self.cfg.log.progress_bar, self.total_steps, initial=p.step,
                                   enabled=self.env.is_main, every_s=self.cfg.log.progress_every_s,
                                   samples_per_step=t.global_batch_size, steps_per_epoch=self.train.steps_per_epoch)
        batches = self._global_batches()
        self._fit_start = window_start = warm_at = time.perf_counter()
        self._first_step = p.step
        self.wrapped.train()
        if self.sentinel is not None:
            self.sentinel.start(p.step)
        if self.early is not None and self.early.reason:  # resumed from the run's own early stop
            self.stopped_early = {"step": self.early.stopped_at, "reason": self.early.reason}
        try:
            if self.stopped_early is None and p.epoch_done(self.train.steps_per_epoch) and p.step < self.total_steps:
                self._end_epoch()  # resumed from the last step of an epoch, before its evaluation
            while p.step < self.total_steps and self.stopped_early is None:
                self._phase("data")
                micro = self._next(batches)
                if self.profiler is not None:
                    self.profiler.before_step(p.step + 1)
                self._phase("step")
                if p.step + 1 in self.guard.skip_steps:  # a batch that went bad before the rollback
                    applied = None
                    self.scheduler.step()
                else:
                    loss, correct, scored, applied = self.train_step(micro)
                p.stepped()
                self._progressed()
                self.first_step_at = self.first_step_at or time.time()
                if self.profiler is not None:
                    self.profiler.after_step(p.step)
                if isinstance(applied, torch.Tensor):  # decided on the device; masked there
                    self.window.add(loss, correct, scored, skipped=applied)
                    self.verdicts.add(p.step, applied, scored)
                    applied = None
                elif applied:
                    self.window.add(loss, correct, scored)
                if applied is not None and self.guard.record(p.step, applied) or (
                        self._verdicts_due() and self._read_verdicts()):
                    self._rollback()
                    batches = self._global_batches()
                    continue
                # while a streak lasts, pruning spares the newest checkpoint from before it
                self.checkpointer.hold_before = self.guard.streak[0] if self.guard.streak else None
                if p.step == self._first_step + WARM_STEPS:
                    dist.warm()  # from here a long wait is a hang: parallel.timeout_s applies
                    if self.sentinel is not None:
                        self.sentinel.warm = True
                    warm_at = time.perf_counter()
                elif p.step == self._first_step + WARM_STEPS + PACE_STEPS:
                    self.preemption.pace((time.perf_counter() - warm_at) / PACE_STEPS)
                if p.step % t.log_every_steps == 0 or p.step == self.total_steps:
                    self._phase("log")
                    self._log_train(time.perf_counter() - window_start)
                    window_start = time.perf_counter()
                bar.update(step=p.step, epoch=p.epoch, epoch_done=p.epoch_done(self.train.steps_per_epoch))
                if self.preemption.due(p.step):  # a signal on any rank, one step late; or simulated
                    self._preempt()
                if p.step >= self.total_steps:
                    break
                if self.checkpointer.due_step(p.step):
                    self._save("step")
                if p.epoch_done(self.train.steps_per_epoch):
                    self._end_epoch()
                if self.stopped_early is not None:
                    break
        finally:
            self.preemption.settle()  # no vote left in flight when the loop ends, however it ends
            if self.profiler is not None:
                self.profiler.close(quietly=True)
            bar.close()
            self.last_step_at = time.time()
            self.train_time += time.perf_counter() - self._fit_start
            self._fit_start = None
        closed_epoch = p.epoch_done(self.train.steps_per_epoch)
        if closed_epoch:
            p.next_epoch()  # the last step closed an epoch: the final evaluation covers it
        if self.history and self.history[-1]["step"] == p.step:
            final = self.last_eval  # early stopping just evaluated this very model
        else:
            final = self.run_eval()
            if self.best is not None:
                self.best.offer(p.step, self.history[-1])  # the final checkpoint may be the best too
            if closed_epoch and p.epoch % t.eval_every_epochs == 0:  # where a longer run evaluates too:
                self._early_stop(self.history[-1])  # a resume that trains on counts it, as that run does
        self._save("final")
        if self.sentinel is not None:
            self.sentinel.stop()  # what follows (summary, plots, W&B finish) is not a training step
        return final

    def _verdicts_due(self) -> bool:
        """Read the device flags where the host reads this step's results anyway (a log step, a checkpoint,
        an epoch's end), at the run's end, and at the latest every max_bad_steps steps."""
        p, n = self.progress, len(self.verdicts)
        return n > 0 and (n >= self.guard.max_bad_steps or p.step % self.cfg.train.log_every_steps == 0
                          or p.step >= self.total_steps or self.checkpointer.due_step(p.step)
                          or p.epoch_done(self.train.steps_per_epoch))

    def _read_verdicts(self) -> bool:
        """The pending steps' verdicts, in order, into the guard (one host sync); a skipped step leaves the
        loss window's host counts too. True when a streak calls for the rollback: that streak's last step
        ends the reading (the steps after it are undone by the rollback anyway)."""
        for step, applied, scored in self.verdicts.read():
            if not applied:
                self.window.unadd(scored)
            if self.guard.record(step, applied):
                return True
        return False

    def _phase(self, name: str) -> None:
        if self.sentinel is not None:
            self.sentinel.enter(name)

    def _progressed(self) -> None:
        if self.sentinel is not None:
            self.sentinel.progressed(self.progress.step)

    def _rollback(self) -> None:
        """max_bad_steps non-finite steps in a row: back to the newest checkpoint, those batches skipped
        from now on; the second time, Diverged. Every rank gets here at the same step (the norm is global)."""
        bad = self.guard.streak
        where = f"non-finite gradient norm at steps {spans(bad)} ({len(bad)} in a row)"
        advice = "lower optim.lr, set train.grad_clip, or use train.precision=fp32"
        if self.guard.rollbacks >= 1:
            raise Diverged(f"diverged: {where}, again after rolling back to step {self.guard.rolled_back_to}; {advice}")
        first = bad[0]
        self.guard.rolled_back()
        keep = self.guard.state_dict()
        self._phase("checkpoint")
        path = self.checkpointer.rollback(before=first)
        if path is None:
            raise Diverged(f"diverged: {where} and no checkpoint to roll back to (checkpoint.every_steps saves "
                           f"more often); {advice}")
        keep["rolled_back_to"] = self.progress.step
        self.guard.load_state_dict(keep)  # the checkpoint's own guard state predates the streak
        self.checkpointer.hold_before = None
        self.checkpointer.last_saved_step = None
        self._save("rollback")  # the same step again, now with the batches to skip: a crash keeps them
        self._progressed()
        log.warning("%s: rolled back to step %d (%s); those global batches are skipped from now on", where,
                    self.progress.step, path.name)
        if self.progress.epoch_done(self.train.steps_per_epoch):
            self._end_epoch()

    def _global_batches(self):
        """Endless: the micro-batches of the next optimizer step, epoch after epoch, from where the progress
        says (the epoch's order is a function of its number: an exact mid-epoch resume)."""
        accum = self.cfg.train.grad_accum_steps
        while True:
            micro = []
            for batch in self.train.epoch(self.progress.epoch, start_step=self.progress.step_in_epoch):
                micro.append(batch)
                if len(micro) == accum:
                    yield micro
                    micro = []

    def _next(self, batches) -> list:
        start = time.perf_counter()
        micro = next(batches)
        waited = time.perf_counter() - start
        self.data_wait_s += waited
        self._window_wait_s += waited
        return micro

    def _end_epoch(self) -> None:
        p = self.progress
        p.next_epoch()
        best = False
        if p.epoch % self.cfg.train.eval_every_epochs == 0:
            self.run_eval()
            metrics = self.history[-1]
            best = self.best is not None and self.best.offer(p.step, metrics)
            self._early_stop(metrics)
        if self.checkpointer.due_epoch(p.epoch) or best:
            self._save("epoch" if self.checkpointer.due_epoch(p.epoch) else "best")

    def _early_stop(self, metrics: dict) -> None:
        if self.early is not None and self.early.update(metrics, self.progress.step):
            self.stopped_early = {"step": self.progress.step, "reason": self.early.reason}
            log.warning("early stopping: %s", self.early.reason)

    def _save(self, reason: str) -> None:
        self._phase("checkpoint")
        with self.counters.excluded():
            self.checkpointer.save(self.progress.step, reason, self.step_time_s())
        self._progressed()

    def _log_train(self, seconds: float) -> None:
        # The one host-device sync: every log interval. Mean of the global-batch losses = same number
        # at any world size.
        w = self.window
        timed = w.steps - w.untimed  # steps restored from a checkpoint were not timed in this process
        metrics = {"epoch": self.progress.epoch}
        metrics.update(window_metrics(dist.all_reduce_sum(w.packed()).tolist(), w.steps, timed,
                                      self.env.world_size, self.cfg.train.global_batch_size, seconds,
                                      self._window_wait_s, self.scheduler.get_last_lr()[0]))
        if self.guard.enabled:
            metrics["train/skipped_steps"] = self.guard.skipped
        if self.flops and timed:
            metrics.update(perf_metrics(self.flops["train"], metrics["train/samples_per_s"], self.env.world_size,
                                        self.peak_tflops))
            self.tflops.append(metrics["perf/tflops_per_device"])
        if self.stats is not None:  # one small all-gather on the CPU group
            metrics.update(self.stats.gather(self._window_wait_s, seconds, max(timed, 1))[0])
        self._window_wait_s = 0.0
        metrics.update(self.counters.window(max(timed, 1)))
        if self.device.type == "cuda":
            metrics["sys/peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.logger.log_metrics(metrics, self.progress.step)
        if self._bar is not None:
            self._bar.saw(metrics)
        w.reset()

    def run_eval(self) -> dict:
        with self.counters.excluded():
            return self._run_eval()

    def _run_eval(self) -> dict:
        self._phase("eval")
        dist.broadcast_buffers(self.model)  # evaluate the model the checkpoint holds, on every rank
        dummy = self.evals.dummy_input() if self.cfg.parallel.strategy == "fsdp" else None
        tick = (lambda *_: self.sentinel.progressed()) if self.sentinel is not None else None
        result = evaluate(self.model, self.evals, self.num_classes, self.device, self.precision.autocast, dummy,
                          loss_fn=self._eval_loss, on_batch=tick)
        metrics = {"epoch": self.progress.epoch, "val/loss": result["loss"], "val/top1": result["top1"],
                   "val/top5": result["top5"], "val/count": result["count"]}
        if self.ema is not None:  # the averaged weights, on the same batches
            dist.broadcast_buffers(self.ema.module)
            ema = evaluate(self.ema.module, self.evals, self.num_classes, self.device, self.precision.autocast,
                           dummy, loss_fn=self._eval_loss, on_batch=tick)
            metrics.update({"val_ema/loss": ema["loss"], "val_ema/top1": ema["top1"], "val_ema/top5": ema["top5"]})
        self.logger.log_metrics(metrics, self.progress.step)
        self.history.append({"step": self.progress.step, **metrics})
        self.last_eval = result
        return result

    def _preempt(self) -> None:
        self.preemption.settle()  # the save's collectives go after the in-flight vote, on every rank
        if self._read_verdicts():  # the checkpoint holds the guard's exact state
            self._rollback()
        log.warning("preemption signal (%s) received: saving at step %d and exiting for requeue",
                    self.preemption.signal_name or "on another rank", self.progress.step)
        self._save("preempt")
        raise Preempted()

    def step_time_s(self) -> float:
        """Mean seconds per optimizer step so far (0 before the first one)."""
        done = self.progress.step - self._first_step
        elapsed = self.train_time + (time.perf_counter() - self._fit_start if self._fit_start else 0.0)
        return elapsed / done if done > 0 else 0.0
