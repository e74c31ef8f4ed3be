"""Rank 0's progress: a tqdm bar on a terminal; in a file (`> run.log`, a SLURM .out) plain lines instead, one
every `log.progress_every_s` seconds and one at each epoch end, never a carriage return. The loss is the
latest logged train/loss (the loss window lives on the device: reading it per step would be a host sync)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("ddp_train")


def bar_mode(setting: str | bool) -> str:
    """log.progress_bar: 'auto' | 'always' | 'never'; true/false (older configs) mean auto/never."""
    if setting is True:
        return "auto"
    if setting is False:
        return "never"
    return setting


def is_terminal(stream: Any = None) -> bool:
    """A terminal, or a Jupyter kernel (whose tqdm.auto bar is a widget, not carriage returns)."""
    stream = stream if stream is not None else sys.stdout
    ipython = sys.modules.get("IPython")  # inside a Jupyter kernel, not merely with ipykernel imported
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    if type(shell).__name__ == "ZMQInteractiveShell":
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced stream without isatty, or a closed one
        return False


def clock(seconds: float) -> str:
    """0:00:07, 1:02:03; '?' before there is a rate to project."""
    if seconds != seconds or seconds == float("inf") or seconds < 0:  # NaN / inf
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(step: int, total: int, epoch: int, epochs: int, samples_per_s: float | None,
                  loss: float | None, elapsed_s: float, eta_s: float | None, epoch_end: bool = False) -> str:
    """'step 120/744 (16%) | epoch 3/12 | 2034 samples/s | loss 0.2341 | elapsed 0:00:12 | ETA 0:01:05'.
    `epoch` is 1-based: the epoch the step belongs to; an epoch-end line says 'epoch 3/12 done'."""
    pct = 100 * step // max(total, 1)
    parts = [f"step {step}/{total} ({pct}%)", f"epoch {epoch}/{epochs}" + (" done" if epoch_end else ""),
             f"{samples_per_s:.0f} samples/s" if samples_per_s is not None else "? samples/s",
             f"loss {loss:.4g}" if loss is not None else "loss ?",
             f"elapsed {clock(elapsed_s)}", f"ETA {clock(eta_s) if eta_s is not None else '?'}"]
    return " | ".join(parts)


class Progress:
    """Rank 0 only (elsewhere it does nothing). mode: log.progress_bar. The trainer calls update() after
    each step (with the epoch and whether the step closed it) and saw() with each train log's metrics."""

    def __init__(self, mode: str | bool, total: int, initial: int = 0, *, enabled: bool = True,
                 every_s: float = 30.0, samples_per_step: int = 0, steps_per_epoch: int = 0, stream: Any = None,
                 now=time.monotonic, emit=None):
        stream = stream if stream is not None else sys.stdout
        mode = bar_mode(mode)
        self.total, self.step, self.first = total, initial, initial
        self.every_s, self.samples_per_step, self.steps_per_epoch = every_s, samples_per_step, steps_per_epoch
        self.now, self.emit = now, emit or log.info
        self.loss: float | None = None
        self.started = self.last_line = now()
        self.enabled = enabled
        use_bar = enabled and (mode == "always" or (mode == "auto" and is_terminal(stream)))
        self.bar = tqdm(total=total, initial=initial, unit="step", file=stream, dynamic_ncols=True,
                        leave=False) if use_bar else None
        self.lines = enabled and not use_bar

    def saw(self, metrics: dict[str, Any]) -> None:
        loss = metrics.get("train/loss")
        if loss is not None:
            self.loss = float(loss)

    def update(self, n: int = 1, *, step: int | None = None, epoch: int | None = None, epoch_done: bool = False,
               **postfix) -> None:
        """n more steps, or now at `step` (a NaN-guard rollback goes back)."""
        n = step - self.step if step is not None else n
        self.step += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            return
        if not self.lines:
            return
        t = self.now()
        if epoch_done or self.step >= self.total or t - self.last_line >= self.every_s:
            self.emit(self.line(epoch, epoch_done, t))
            self.last_line = t

    def line(self, epoch: int | None, epoch_done: bool, t: float) -> str:
        elapsed = t - self.started
        done = self.step - self.first
        rate = done / elapsed if elapsed > 0 and done > 0 else None  # steps/s in this process
        spe = max(self.steps_per_epoch, 1)
        epochs = -(-self.total // spe)
        # `epoch` is the trainer's 0-based epoch, not yet advanced by the step that closes it
        shown = epoch + 1 if epoch is not None else (self.step - 1) // spe + 1
        return progress_line(self.step, self.total, max(shown, 1), epochs,
                             rate * self.samples_per_step if rate else None, self.loss, elapsed,
                             (self.total - self.step) / rate if rate else None, epoch_end=epoch_done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
