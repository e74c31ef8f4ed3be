"""NaN/inf guard. The test is the global gradient norm after the gradient all-reduce (or FSDP's reduced
norm): a non-finite loss or gradient on any rank makes the summed gradients non-finite on every rank,
and the ranks hold the very same reduced tensors, so they agree without a vote and without waiting for
the lagged preemption vote (which would let one bad update through). Reading the norm is one host sync
per step, the same one fp16's GradScaler makes; `train.nan_guard=false` removes it.

A bad step leaves the optimizer, EMA and weights untouched (the batch is consumed and the schedule
moves on, so the LR stays a function of the step). After `train.max_bad_steps` bad steps in a row the run
rolls back to the newest checkpoint and never trains on those global batches again (their steps are kept
here, in the checkpoint, so a resume skips them too); a second streak stops the run with DIVERGED_EXIT."""
from __future__ import annotations

import math

import torch
from torch import nn


def global_grad_norm(wrapped: nn.Module, clip: float | None) -> torch.Tensor:
    """The total gradient norm over every rank's gradients (FSDP2 reduces it across shards), clipping to
    `clip` when set; without a clip only the norm (one pass over the gradients, no rescale)."""
    if clip is not None or not hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.clip_grad_norm_(wrapped.parameters(), clip if clip is not None else float("inf"))
    return torch.nn.utils.get_total_norm([p.grad for p in wrapped.parameters() if p.grad is not None])


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
