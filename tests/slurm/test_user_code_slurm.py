"""A user's project (its own model, dataset and loss by import path) through the SLURM launcher on the
local cluster: submitted from the project's directory, preempted with USR2 mid-run, requeued, resumed;
the final weights equal the same config on 2 local processes, bit for bit."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import (
    CONFIGS,
    USER_ARGS,
    check,
    final_checkpoint,
    read_jsonl,
    run_engine,
    slurm,
    write_user_project,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ARGS = [str(CONFIGS / "cpu_smoke.yaml"), *USER_ARGS, "train.max_steps=160", "train.epochs=10",
        "train.log_every_steps=10", "checkpoint.every_epochs=null"]


def test_user_code_job_is_preempted_requeued_and_resumes_bitwise(slurm_env, tmp_path):
    project = write_user_project(tmp_path / "project")
    check(run_engine([*ARGS, f"run.root={tmp_path / 'local'}", "run.name=ref"], nproc=2, cwd=project))
    root = tmp_path / "runs"
    cmd = [sys.executable, "-m", "launch.slurm", *ARGS, f"run.root={root}", "--tasks-per-node", "2", "--time", "5",
           "--wait"]
    proc = subprocess.Popen(cmd, cwd=project, env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job_id, deadline = None, time.time() + 60
        while job_id is None and time.time() < deadline:
            m = re.match(r"^  (\d+)  ", proc.stdout.readline())
            job_id = m and m[1]
        assert job_id, "the launcher printed no job id"
        metrics = root / f"cpu_smoke-job{job_id}" / "metrics.jsonl"
        while time.time() < deadline:
            if metrics.exists() and any(r.get("step", 0) >= 30 for r in read_jsonl(metrics)):
                break
            time.sleep(0.1)
        slurm(["scancel", "--signal=USR2", job_id], slurm_env)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    run_dir = root / f"cpu_smoke-job{job_id}"
    assert "resuming at step" in (run_dir / "train.log").read_text()
    ref, got = final_checkpoint(tmp_path / "local" / "ref"), final_checkpoint(run_dir)
    assert got["progress"]["step"] == 160
    assert all(torch.equal(ref["model"][k], got["model"][k]) for k in ref["model"])
