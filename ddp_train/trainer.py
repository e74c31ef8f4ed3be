"""The step loop. Reads top to bottom: micro-batches -> forward/backward (grad sync on the last one) ->
clip -> step -> log/evaluate/checkpoint at their intervals. Losses stay on the device between log
steps, so there is no host-device sync per step."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import dist
from .config import Config
from .data import EvalBatches, TrainBatches
from .dist import DistEnv
from .loggers import Logger, Progress
from .metrics import evaluate
from .parallel import grad_sync
from .precision import Precision
from .preempt import PreemptionFlag

log = logging.getLogger("ddp_train")


@dataclass
class TrainProgress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps done inside `epoch`: where a resumed run continues


WARM_STEPS = 2  # start-up, resume and the first (compiling) step run under parallel.init_timeout_s


class Preempted(Exception):
    """Raised after the agreed preemption save; run.py turns it into PREEMPTED_EXIT."""


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, model: nn.Module, wrapped: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler, precision: Precision, train: TrainBatches,
                 evals: EvalBatches, num_classes: int, logger: Logger, checkpointer, preemption: PreemptionFlag):
        self.cfg, self.env = cfg, env
        self.model, self.wrapped = model, wrapped  # `model` is unwrapped: state_dicts and evaluation
        self.optimizer, self.scheduler, self.precision = optimizer, scheduler, precision
        self.train, self.evals, self.num_classes = train, evals, num_classes
        self.logger, self.checkpointer, self.preemption = logger, checkpointer, preemption
        self.progress = TrainProgress()
        self.device = env.device
        t = cfg.train
        self.total_steps = t.epochs * train.steps_per_epoch
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.samples_per_step = t.global_batch_size
        self.history: list[dict] = []  # eval results, for the summary
        self.last_eval: dict | None = None
        self.train_time = 0.0
        # The current log window: this rank's summed losses (on the device) and steps. Checkpoints carry
        # it, so the first loss logged after a resume averages the same steps as an uninterrupted run's.
        self.loss_window = torch.zeros((), device=self.device)
        self.steps_since_log = 0
        self._fit_start, self._first_step = None, 0
        self.data_wait_s = 0.0  # host time spent waiting for the next batch: total, and this log window
        self._window_wait_s = 0.0

    # ------------------------------------------------------------------------------------ stepping
    def _forward_backward(self, x, y, sync: bool) -> torch.Tensor:
        accum = self.cfg.train.grad_accum_steps
        with grad_sync(self.wrapped, sync), self.precision.autocast():
            logits = self.wrapped(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.train.label_smoothing)
            self.precision.scaler.scale(loss / accum).backward()
        return loss.detach() / accum

    def _optimizer_step(self) -> None:
        scaler = self.precision.scaler
        if self.cfg.train.grad_clip is not None:
            scaler.unscale_(self.optimizer)  # clip true gradients, not loss-scaled ones
            torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), self.cfg.train.grad_clip)
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    # ---------------------------------------------------------------------------------------- fit
    def fit(self) -> dict:
        cfg, p = self.cfg, self.progress
        bar = Progress(cfg.log.progress_bar and self.env.is_main, self.total_steps, initial=p.step)
        loss_sum = self.loss_window
        window_start, untimed = time.perf_counter(), self.steps_since_log  # steps from before a resume
        start = self._fit_start = time.perf_counter()
        self._first_step = p.step
        agreement = self._agreement = dist.LaggedAnyRank()
        self.wrapped.train()
        try:
            while p.step < self.total_steps:
                micro = 0
                for x, y in self._timed(self.train.epoch(p.epoch, start_step=p.step_in_epoch)):
                    micro += 1
                    last_micro = micro == cfg.train.grad_accum_steps
                    loss_sum += self._forward_backward(x, y, sync=last_micro)
                    if not last_micro:
                        continue
                    micro = 0
                    self._optimizer_step()
                    p.step += 1
                    p.step_in_epoch += 1
                    if p.step == self._first_step + WARM_STEPS:
                        dist.warm()  # from here a long wait is a hang: parallel.timeout_s applies
                    self.steps_since_log += 1
                    bar.update(1)
                    if p.step % cfg.train.log_every_steps == 0 or p.step == self.total_steps:
                        self._log_train(loss_sum, self.steps_since_log, self.steps_since_log - untimed,
                                        time.perf_counter() - window_start)
                        loss_sum.zero_()
                        self.steps_since_log, untimed, window_start = 0, 0, time.perf_counter()
                    if p.step == cfg.checkpoint.simulate_preempt_at_step:  # every rank knows: no vote
                        self.preemption.requested, self.preemption.signal_name = True, "simulated"
                        self._preempt()
                    if agreement.poll(self.preemption.requested):  # a signal on any rank, one step late
                        self._preempt()
                    if p.step >= self.total_steps:
                        break
                    if self.checkpointer.due_step(p.step):
                        self.checkpointer.save(self, reason="step")
                if p.step_in_epoch >= self.train.steps_per_epoch:
                    p.epoch += 1
                    p.step_in_epoch = 0
                    if p.epoch % cfg.train.eval_every_epochs == 0 and p.step < self.total_steps:
                        self.run_eval()
                    if self.checkpointer.due_epoch(p.epoch) and p.step < self.total_steps:
                        self.checkpointer.save(self, reason="epoch")
        finally:
            agreement.drain()  # no all-reduce left in flight when the loop ends, however it ends
            bar.close()
            self.train_time += time.perf_counter() - start
            self._fit_start = None
        final = self.run_eval()
        self.checkpointer.save(self, reason="final")
        return final

    def _timed(self, batches):
        """Yields the batches, adding the time spent waiting for each to data_wait_s."""
        it = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            waited = time.perf_counter() - start
            self.data_wait_s += waited
            self._window_wait_s += waited
            yield batch

    def _log_train(self, loss_sum: torch.Tensor, steps: int, timed_steps: int, seconds: float) -> None:
        # The one host-device sync: every log interval. Mean of the global-batch losses = same number
        # at any world size.
        mean = dist.all_reduce_sum(loss_sum.detach().clone()).item() / (steps * self.env.world_size)
        metrics = {"epoch": self.progress.epoch, "train/loss": mean, "train/lr": self.scheduler.get_last_lr()[0],
                   "train/samples_per_s": timed_steps * self.samples_per_step / max(seconds, 1e-9),
                   "train/step_time_s": seconds / max(timed_steps, 1),
                   "train/data_wait_frac": min(1.0, self._window_wait_s / max(seconds, 1e-9))}
        self._window_wait_s = 0.0
        if self.device.type == "cuda":
            metrics["sys/peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.logger.log_metrics(metrics, self.progress.step)

    def run_eval(self) -> dict:
        dist.broadcast_buffers(self.model)  # evaluate the model the checkpoint holds, on every rank
        dummy = None
        if self.cfg.parallel.strategy == "fsdp":
            dummy = self.evals.dummy_input()
        result = evaluate(self.model, self.evals, self.num_classes, self.device, self.precision.autocast, dummy)
        metrics = {"epoch": self.progress.epoch, "val/loss": result["loss"], "val/top1": result["top1"],
                   "val/top5": result["top5"], "val/count": result["count"]}
        self.logger.log_metrics(metrics, self.progress.step)
        self.last_eval = result
        self.history.append({"step": self.progress.step, **metrics})
        return result

    def _preempt(self) -> None:
        self._agreement.drain()  # the save's collectives go after the in-flight vote, on every rank
        log.warning("preemption signal (%s) received: saving at step %d and exiting for requeue",
                    self.preemption.signal_name or "on another rank", self.progress.step)
        self.checkpointer.save(self, reason="preempt")
        raise Preempted()

    def step_time_s(self) -> float:
        """Mean seconds per optimizer step so far (0 before the first one)."""
        done = self.progress.step - self._first_step
        elapsed = self.train_time + (time.perf_counter() - self._fit_start if self._fit_start else 0.0)
        return elapsed / done if done > 0 else 0.0

    # ----------------------------------------------------------------------------------- state
    def progress_dict(self) -> dict:
        return asdict(self.progress)

    def load_progress(self, d: dict) -> None:
        self.progress = TrainProgress(**d)

    def window_state(self) -> tuple[float, int]:
        return self.loss_window.item(), self.steps_since_log  # a sync, but only when saving

    def set_window_state(self, state) -> None:
        self.loss_window.fill_(float(state[0]))
        self.steps_since_log = int(state[1])
