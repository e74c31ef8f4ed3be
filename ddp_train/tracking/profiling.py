"""`profile.steps: [a, b]`: torch.profiler over optimizer steps a..b (1-based, inclusive) on the ranks in
`profile.ranks`, CPU activities plus CUDA on a GPU. Writes RUN_DIR/profile/trace_rank<R>.json (Chrome
trace: chrome://tracing, Perfetto, TensorBoard's profiler plugin) and top_ops_rank<R>.txt; rank 0's table
goes to train.log. Off (profile.steps null), the loop holds None and never calls in here."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("ddp_train")


class ProfileWindow:
    def __init__(self, first: int, last: int, out_dir: Path, rank: int, device: torch.device,
                 record_shapes: bool = False, on_done=None):
        self.first, self.last, self.dir, self.rank = first, last, out_dir, rank
        self.cuda = device.type == "cuda"
        self.record_shapes = record_shapes
        self.on_done = on_done  # (directory): e.g. the W&B artifact
        self._prof = None
        self.done = False

    @classmethod
    def build(cls, cfg, rank: int, device: torch.device, run_dir: Path, on_done=None) -> ProfileWindow | None:
        if not cfg.steps or rank not in cfg.ranks:
            return None
        return cls(cfg.steps[0], cfg.steps[1], run_dir / "profile", rank, device, cfg.record_shapes, on_done)

    def before_step(self, step: int) -> None:
        """`step`: the number the coming optimizer step will have."""
        if self._prof is None and not self.done and self.first <= step <= self.last:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self._prof = profile(activities=activities, record_shapes=self.record_shapes)
            self._prof.__enter__()
            self._started = step

    def after_step(self, step: int) -> None:
        if self._prof is not None and step >= self.last:
            self.close()

    def close(self, quietly: bool = False) -> None:
        """quietly: the loop is ending (maybe on an exception): a failed export only warns."""
        if self._prof is None:
            return
        if quietly:
            try:
                self.close()
            except Exception as e:
                self._prof = None
                log.warning("profiler export failed: %s", e)
            return
        if self.cuda:
            torch.cuda.synchronize()
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.done = True
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self.dir / f"trace_rank{self.rank}.json"
        prof.export_chrome_trace(str(trace))
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=15)
        (self.dir / f"top_ops_rank{self.rank}.txt").write_text(table + "\n")
        if self.rank == 0:
            log.info("profile of steps %d-%d (rank 0), top ops by %s:\n%s\ntrace: %s", self._started, self.last,
                     sort, table, trace)
        if self.on_done is not None:
            self.on_done(self.dir)
