"""`log.tensorboard: true`: the metrics of metrics.jsonl as TensorBoard scalars under RUN_DIR/tb/, from
rank 0 (`tensorboard --logdir runs/` compares runs; for clusters where W&B is not allowed). Text values
(the slowest rank's host) are left out; the summary's numbers go in as `summary/*` at the last step."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .loggers import Logger


class TensorBoardLogger(Logger):
    def __init__(self, log_dir: Path):
        self.log_dir, self.writer, self.last_step = log_dir, None, 0

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if self.writer is None:  # purge_step: events a crashed attempt wrote from this step on are dropped,
            # as metrics.jsonl drops its rows (the replayed values win)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=step)
        self.last_step = step
        for key, value in metrics.items():
            if _number(value):
                self.writer.add_scalar(key, float(value), step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in summary.items():
            if _number(value):
                self.writer.add_scalar(f"summary/{key}", float(value), self.last_step)

    def finish(self, exit_code: int = 0) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _number(value: Any) -> bool:
    if hasattr(value, "item"):
        value = value.item()
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
