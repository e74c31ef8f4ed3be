"""Logger interface: the default does nothing, so the loop never asks `if wandb:`. Rank 0 gets real
loggers (console lines, metrics.jsonl, W&B); every other rank gets the base Logger, which does nothing.
The console itself (rank-aware handlers, warnings once per job) is console.py; the progress bar or lines,
progress.py."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from .console_line import full_line, short_line

log = logging.getLogger("ddp_train")


class Logger:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_summary(self, summary: dict[str, Any]) -> None: ...
    def log_checkpoint(self, path: Path, step: int) -> None: ...
    def log_profile(self, directory: Path) -> None: ...
    def ready(self) -> None:
        """Waits for a logger that starts in the background (W&B): before training, so no step waits."""
    def finish(self, exit_code: int = 0) -> None: ...


class MultiLogger(Logger):
    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log_metrics(self, metrics, step):
        for lg in self.loggers:
            lg.log_metrics(metrics, step)

    def log_summary(self, summary):
        for lg in self.loggers:
            lg.log_summary(summary)

    def log_checkpoint(self, path, step):
        for lg in self.loggers:
            lg.log_checkpoint(path, step)

    def log_profile(self, directory):
        for lg in self.loggers:
            lg.log_profile(directory)

    def ready(self):
        for lg in self.loggers:
            lg.ready()

    def finish(self, exit_code=0):
        for lg in self.loggers:
            try:
                lg.finish(exit_code)
            except Exception as e:  # tracking must never turn a finished job into a failed one
                log.warning("logger %s failed to finish: %s", type(lg).__name__, e)


class JsonlLogger(Logger):
    """metrics.jsonl: one JSON object per log step or evaluation, flushed as written. Also the state
    'metrics_log' of checkpoints: the rows written when a checkpoint was saved. A run resumed after a
    crash replays the steps after that checkpoint, so loading cuts the file back to those rows first and
    every step appears once, the replayed values winning (after a preemption nothing follows the save).
    Whether the file is the checkpoint's own is told by its first row (step and time to the millisecond),
    not by its path: a run directory moved or mounted elsewhere on a requeue node is still the same run,
    and another run's checkpoint (checkpoint.resume=PATH) never cuts this run's file."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = _count_lines(path)
        self.first = _first_line(path)  # None until the first row is written
        self.file = None  # opened at the first row: a run that fails before training leaves no empty file

    def log_metrics(self, metrics, step):
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        line = json.dumps(record)
        if self.file is None:
            self.file = open(self.path, "a", buffering=1)
        self.file.write(line + "\n")
        self.rows += 1
        self.first = self.first or line

    def state_dict(self) -> dict:
        return {"rows": self.rows, "path": str(self.path.resolve()), "first": self.first}

    def _is_mine(self, state: dict) -> bool:
        if "first" in state:
            return state["first"] is not None and state["first"] == self.first
        return state.get("path") == str(self.path.resolve())  # a checkpoint from before "first" was kept

    def load_state_dict(self, state: dict) -> None:
        keep = int(state["rows"])
        if keep >= self.rows or not self._is_mine(state):
            return  # nothing was logged after the checkpoint, or it is another run's (resume=PATH)
        if self.file is not None:
            self.file.close()
            self.file = None
        lines = self.path.read_text().splitlines(keepends=True)
        dropped = len(lines) - keep
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(lines[:keep]))
        tmp.replace(self.path)
        self.rows = keep
        log.info("metrics.jsonl: dropped %d rows logged after the checkpoint; those steps are replayed", dropped)

    def finish(self, exit_code=0):
        if self.file is not None:
            self.file.close()
            self.file = None


class NoState:
    """Stands in for a state only rank 0 holds (metrics.jsonl's rows) on the other ranks."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


def _first_line(path: Path) -> str | None:
    try:
        with open(path) as f:
            return f.readline().rstrip("\n") or None
    except FileNotFoundError:
        return None


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


class ConsoleLogger(Logger):
    """One line per log interval / evaluation, through logging (console + train.log): short or every metric
    (log.console_metrics; see console_line)."""

    def __init__(self, metrics: str = "short", straggler_factor: float = 1.5):
        self.metrics, self.straggler_factor = metrics, straggler_factor

    def log_metrics(self, metrics, step):
        if self.metrics == "all":
            log.info(full_line(metrics, step))
        else:
            log.info(short_line(metrics, step, self.straggler_factor))


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
