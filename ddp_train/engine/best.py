"""checkpoint.keep_best: the N best checkpoints by checkpoint.best_metric, kept beside the newest
keep_last and never pruned by it; `checkpoints/best.json` names the best one (evaluate/export/predict
--best read it). Every rank sees the same all-reduced metrics, so every rank takes the same decision."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..rundir.checkpoints import BEST_FILE


def higher_is_better(metric: str) -> bool:
    return "loss" not in metric  # top1/top5 go up, losses go down


class BestCheckpoints:
    def __init__(self, keep: int, metric: str):
        self.keep, self.metric = keep, metric
        self.sign = 1.0 if higher_is_better(metric) else -1.0
        self.entries: list[tuple[float, int]] = []  # (value, step), best first

    def offer(self, step: int, metrics: dict) -> bool:
        """Records an evaluation; True when it ranks among the `keep` best (it must then be saved)."""
        value = metrics.get(self.metric)
        if self.keep <= 0 or value is None:
            return False
        others = [e for e in self.entries if e[1] != step]  # a step evaluated again (a resume) counts once
        ranked = sorted([*others, (float(value), step)], key=lambda e: (-self.sign * e[0], e[1]))
        self.entries = ranked[: self.keep]
        return (float(value), step) in self.entries

    def steps(self) -> set[int]:
        return {step for _, step in self.entries}

    def write_pointer(self, directory: Path) -> None:
        """best.json names the best entry whose checkpoint is on disk (a save that failed has none)."""
        saved = [(v, s) for v, s in self.entries if (directory / f"step_{s:08d}.pt").is_file()]
        if not saved:
            return
        value, step = saved[0]
        tmp = directory / (BEST_FILE + ".tmp")
        tmp.write_text(json.dumps({"file": f"step_{step:08d}.pt", "step": step, "metric": self.metric,
                                   "value": value, "kept": [{"step": s, "value": v} for v, s in self.entries]}))
        os.replace(tmp, directory / BEST_FILE)

    def state_dict(self) -> dict:
        return {"entries": [[v, s] for v, s in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        self.entries = [(float(v), int(s)) for v, s in state.get("entries", [])]
