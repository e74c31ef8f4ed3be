"""train.early_stopping: stop after `patience` evaluations without an improvement of `metric` by more
than `min_delta` (Keras' and Lightning's EarlyStopping rule). The metrics are all-reduced, so every rank
counts alike and all stop after the same evaluation, with no collective of their own."""
from __future__ import annotations

import math

from ..config.schema import EarlyStoppingConfig


class EarlyStopping:
    def __init__(self, cfg: EarlyStoppingConfig):
        self.cfg = cfg
        self.best: float | None = None
        self.bad = 0  # evaluations since the last improvement
        self.reason: str | None = None  # set once it stopped the run (a resume of that run stops too)
        self.stopped_at: int | None = None

    @property
    def enabled(self) -> bool:
        return self.cfg.patience is not None

    def update(self, metrics: dict, step: int) -> bool:
        """After an evaluation: True when training should stop now."""
        value = metrics.get(self.cfg.metric)
        if not self.enabled or value is None or math.isnan(value):
            return False
        better = (value > self.best + self.cfg.min_delta if self.cfg.mode == "max"
                  else value < self.best - self.cfg.min_delta) if self.best is not None else True
        if better:
            self.best, self.bad = value, 0
            return False
        self.bad += 1
        if self.bad < self.cfg.patience:
            return False
        self.stopped_at = step
        self.reason = (f"{self.cfg.metric} did not improve on {self.best:.6g} by more than {self.cfg.min_delta:g} "
                       f"for {self.bad} evaluations (patience {self.cfg.patience}); stopped at step {step}")
        return True

    def state_dict(self) -> dict:
        return {"best": self.best, "bad": self.bad, "reason": self.reason, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad = state.get("best"), int(state.get("bad", 0))
        self.reason, self.stopped_at = state.get("reason"), state.get("stopped_at")
