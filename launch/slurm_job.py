"""What runs inside each SLURM task: the engine itself, in-process (no torchrun inside). SLURM's srun
started one task per GPU (per process on CPU); ddp_train.env derives rank/world/MASTER_ADDR/port from
SLURM's variables. This module must stay importable without torch: submitit unpickles the job by name."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import submitit


class TrainJob(submitit.helpers.Checkpointable):
    """Checkpointable so that a preemption signal arriving before the engine has installed its own
    handlers (imports, data loading) still requeues the job through submitit's handler. Once training
    runs, the engine's handler owns the signal: it only sets a flag; the ranks save together at the next
    step boundary and the engine returns PREEMPTED_EXIT, after which global rank 0 requeues the job."""

    def __init__(self, config_path: str | None, overrides: list[str], max_requeues: int):
        self.config_path = config_path
        self.overrides = list(overrides)
        self.max_requeues = max_requeues

    def __call__(self) -> dict:
        from ddp_train.__main__ import run_command
        from ddp_train.errors import PREEMPTED_EXIT

        _threads_from_slurm()

        argv = ([self.config_path] if self.config_path else []) + self.overrides
        # Global rank 0 requeues inside the engine, after the save and before any rank exits: on clusters
        # with KillOnBadExit=1 the first rank to exit non-zero gets the others killed.
        rc = run_command(argv, on_preempted=self._requeue_or_give_up)
        if rc == PREEMPTED_EXIT:
            sys.exit(rc)  # SystemExit, not an Exception: submitit writes no result, the job is not over
        if rc != 0:
            sys.exit(rc)  # a user error: the engine printed one line; sacct shows the exit code
        return _summary(self.config_path, self.overrides)

    def _requeue_or_give_up(self) -> None:
        """Runs on global rank 0 only (the engine calls it there): one requeue per job."""
        from ddp_train import env

        job = env.slurm_job_id()
        done = env.slurm_restarts()
        if done >= self.max_requeues:
            print(f"launch.slurm: job {job} was preempted/timed out {done + 1} times; --max-requeues="
                  f"{self.max_requeues} reached, not requeueing. Its checkpoint is saved: submit the same "
                  f"command with run.name={_run_name(self.config_path, self.overrides)} to continue it.",
                  file=sys.stderr, flush=True)
            return
        print(f"launch.slurm: checkpoint saved; requeueing job {job} ({done + 1}/{self.max_requeues})",
              file=sys.stderr, flush=True)
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:  # e.g. SLURM's own preemption already requeued it
            print(f"launch.slurm: scontrol requeue {job}: {proc.stderr.strip()}", file=sys.stderr, flush=True)


def _threads_from_slurm() -> None:
    # torchrun would set OMP_NUM_THREADS=1; srun does not. Use the CPUs SLURM gave this task.
    from ddp_train import env

    cpus = env.slurm_cpus_per_task()
    if cpus and env.getenv("OMP_NUM_THREADS") is None:
        import torch

        torch.set_num_threads(cpus)


def _run_name(config_path: str | None, overrides: list[str]) -> str:
    """The name the engine gave this job's run (an explicit run.name, else <config>-job<id>)."""
    from ddp_train import env
    from ddp_train.config import load_config
    from ddp_train.rundir.naming import default_run_name

    return load_config(config_path, overrides).run.name or default_run_name(config_path, env.launch_id())


def _summary(config_path: str | None, overrides: list[str]) -> dict:
    """The run's summary.json, for submitit's job.result()."""
    from ddp_train.config import load_config

    root = load_config(config_path, overrides).run.root
    path = Path(root) / _run_name(config_path, overrides) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}
