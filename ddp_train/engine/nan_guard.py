"""NaN/inf guard. The test is the global gradient norm after the gradient all-reduce (or FSDP's reduced
norm): a non-finite loss or gradient on any rank makes the summed gradients non-finite on every rank,
and the ranks hold the very same reduced tensors, so they agree without a vote and without waiting for
the lagged preemption vote (which would let one bad update through).

Where the optimizer takes GradScaler's found_inf flag (the fused kernels: the default for DDP and one
process, on CPUs and GPUs) and no fp16 scaler is in play, the verdict stays on the device: the flag
(1.0 = non-finite norm) goes into the fused step, which then leaves weights and state untouched, as
GradScaler's skip does, and the loss window and EMA mask the step on the device too. The host reads the
flags later, all at once (DeferredVerdicts), when it reads the step's other results anyway: at a log
step, before a checkpoint or an evaluation, or every max_bad_steps steps. Elsewhere (foreach/for-loop
kernels, FSDP's DTensors, fp16) the norm is read on the host every step, as GradScaler itself does there.

A bad step leaves the optimizer, EMA and weights untouched (the batch is consumed and the schedule
moves on, so the LR stays a function of the step). After `train.max_bad_steps` bad steps in a row the run
rolls back to the newest checkpoint and never trains on those global batches again (their steps are kept
here, in the checkpoint, so a resume skips them too); a second streak stops the run with DIVERGED_EXIT."""
from __future__ import annotations

import math

import torch
from torch import nn


class GradNorm:
    """The total gradient norm over every rank's gradients (FSDP2 reduces it across shards), clipping to
    `clip` when set; without a clip only the norm (one pass over the gradients, no rescale). The parameter
    list is read once, and when every gradient is a plain tensor of one device and dtype (DDP, one
    process) the norm is one fused _foreach_norm: get_total_norm's own grouping and checks cost 0.4 ms of
    Python a step, 2-3 % of a small model's step (benchmarks/peers.py, docs/benchmarks.md)."""

    def __init__(self, wrapped: nn.Module):
        self.params = [p for p in wrapped.parameters() if p.requires_grad]
        self._fused: bool | None = None

    def __call__(self, clip: float | None) -> torch.Tensor:
        if clip is not None or not hasattr(torch.nn.utils, "get_total_norm"):
            return torch.nn.utils.clip_grad_norm_(self.params, clip if clip is not None else float("inf"))
        grads = [p.grad for p in self.params if p.grad is not None]
        if self._fused is None and grads:
            self._fused = hasattr(torch, "_foreach_norm") and all(type(g) is torch.Tensor for g in grads) and \
                len({(g.device, g.dtype) for g in grads}) == 1
        if self._fused and grads:  # what get_total_norm computes for a single group, bit for bit
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        return torch.nn.utils.get_total_norm(grads)


def device_verdicts_possible(optimizer: torch.optim.Optimizer, scaler_enabled: bool) -> bool:
    """Whether a skip can be decided on the device: the optimizer reads GradScaler's found_inf (fused
    kernels) and no fp16 scaler owns that flag."""
    return not scaler_enabled and bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def step_with_flag(optimizer: torch.optim.Optimizer, step, grad_norm: torch.Tensor) -> torch.Tensor:
    """Runs `step` (the optimizer's, through the disabled scaler) with found_inf set from the norm, as
    GradScaler sets it; returns the flag, on the device: 1.0 when the step was skipped."""
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    flag = (~torch.isfinite(grad_norm)).to(torch.float32)
    optimizer.found_inf = flag  # what fused Adam/AdamW/SGD read, as GradScaler._maybe_opt_step sets it
    try:
        step(optimizer)
    finally:
        del optimizer.found_inf
    return flag


class DeferredVerdicts:
    """The device flags of the steps not yet read on the host, with what the host counted for them."""

    def __init__(self):
        self.pending: list[tuple[int, torch.Tensor, int]] = []  # (step, flag, samples scored)

    def add(self, step: int, flag: torch.Tensor, scored: int) -> None:
        self.pending.append((step, flag, scored))

    def __len__(self) -> int:
        return len(self.pending)

    def read(self) -> list[tuple[int, bool, int]]:
        """(step, applied, scored) of every pending step, in order: one host sync for all of them."""
        if not self.pending:
            return []
        flags = torch.stack([f for _, f, _ in self.pending]).tolist()
        out = [(step, not bad, scored) for (step, _, scored), bad in zip(self.pending, flags)]
        self.pending = []
        return out


class Diverged(Exception):
    """The run cannot go on: run.py prints the one line and exits DIVERGED_EXIT."""


class NanGuard:
    def __init__(self, enabled: bool, max_bad_steps: int):
        self.enabled, self.max_bad_steps = enabled, max_bad_steps
        self.skipped = 0  # bad steps in this run, over every attempt
        self.rollbacks = 0
        self.skip_steps: set[int] = set()  # global batches (by step number) never to train on again
        self.streak: list[int] = []  # the steps of the current run of bad steps
        self.rolled_back_to: int | None = None
        self.where = "host" if enabled else "off"  # where the verdict is taken (the trainer says "device")

    def finite(self, grad_norm: torch.Tensor) -> bool:
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        return math.isfinite(float(grad_norm))

    def record(self, step: int, good: bool) -> bool:
        """After step `step`: True when the streak of bad steps calls for a rollback."""
        if good:
            self.streak = []
            return False
        self.skipped += 1
        self.streak.append(step)
        return len(self.streak) >= self.max_bad_steps

    def rolled_back(self) -> list[int]:
        """The streak's batches are skipped from now on; returns them."""
        bad = list(self.streak)
        self.skip_steps.update(bad)
        self.streak = []
        self.rollbacks += 1
        return bad

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "rollbacks": self.rollbacks, "skip_steps": sorted(self.skip_steps),
                "rolled_back_to": self.rolled_back_to}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.rollbacks = int(state["skipped"]), int(state["rollbacks"])
        self.skip_steps = {int(s) for s in state["skip_steps"]}
        self.rolled_back_to = state.get("rolled_back_to")
        self.streak = []


def spans(steps: list[int]) -> str:
    """[5, 6, 7, 9] -> '5-7, 9'."""
    out, run = [], []
    for s in sorted(steps):
        if run and s != run[-1] + 1:
            out.append(run)
            run = []
        run.append(s)
    if run:
        out.append(run)
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in out)
