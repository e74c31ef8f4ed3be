"""Where a run's time outside training goes: start-up (launch to the first optimizer step) and wind-down
(the last step to the end), each split by phase, for summary.json and the log. Marks are wall-clock
times (time.time()) so they can start from the launcher's own process start, read from /proc."""
from __future__ import annotations

import os
import time

from ..env import getenv, process_start_time

# (field, from mark, to mark): consecutive, so the parts add up to the whole
STARTUP = (("launcher_s", "launch", "process"), ("import_s", "process", "entered"),
           ("process_group_s", "entered", "process_group"), ("data_s", "process_group", "data"),
           ("model_s", "data", "model"), ("setup_and_resume_s", "model", "resumed"),
           ("wandb_wait_s", "resumed", "loggers"), ("first_step_s", "loggers", "first_step"))
TEARDOWN = (("final_eval_and_checkpoint_s", "last_step", "fit_done"), ("summary_and_plots_s", "fit_done", "summary"),
            ("loggers_finish_s", "summary", "finished"), ("shutdown_s", "finished", "end"))


class Timeline:
    def __init__(self):
        own = process_start_time()
        # under torchrun the launch is the agent's start (our parent); ddp-train execs torchrun in place
        agent = process_start_time(os.getppid()) if getenv("TORCHELASTIC_RUN_ID") else None
        self.marks: dict[str, float] = {"launch": agent or own or time.time(), "process": own or time.time()}
        self.mark("entered")

    def mark(self, name: str, at: float | None = None) -> None:
        self.marks[name] = time.time() if at is None else at

    def _split(self, phases) -> dict[str, float]:
        return {field: round(self.marks[b] - self.marks[a], 3) for field, a, b in phases
                if a in self.marks and b in self.marks}

    def startup(self) -> dict:
        """{"startup_s": launch to the first optimizer step, "startup": {phase: seconds}}"""
        if "first_step" not in self.marks:
            return {}
        return {"startup_s": round(self.marks["first_step"] - self.marks["launch"], 3),
                "startup": self._split(STARTUP)}

    def teardown(self) -> dict:
        if "last_step" not in self.marks or "end" not in self.marks:
            return {}
        return {"teardown_s": round(self.marks["end"] - self.marks["last_step"], 3), "teardown": self._split(TEARDOWN)}

    @staticmethod
    def describe(total: float, parts: dict[str, float]) -> str:
        return f"{total:.1f} s: " + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.2f}" for k, v in parts.items())
