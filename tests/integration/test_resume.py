"""Kill a job at any moment, by any means: the resumed run must end exactly where the uninterrupted run
ends. Real torchrun process groups, real signals, real files."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    CONFIGS,
    check,
    engine_env,
    final_checkpoint,
    free_port,
    read_jsonl,
    run_engine,
    worker_pids,
)

from ddp_train.config.argv import engine_command

pytestmark = pytest.mark.slow

# Dropout and augmentation on: their RNG streams must be restored too. 62 steps/epoch: crosses an epoch.
JOB = [str(CONFIGS / "cpu_smoke.yaml"), "model.name=cnn_dropout", "data.augment=true", "train.max_steps=100",
       "train.global_batch_size=64", "train.log_every_steps=1", "checkpoint.every_steps=10",
       "checkpoint.keep_last=20", "train.eval_batch_size=1000"]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    out = {}
    for r in read_jsonl(run_dir / "metrics.jsonl"):
        if "train/loss" in r:
            out[r["step"]] = r["train/loss"]  # a re-done step after a crash: the last value counts
    return out


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = final_checkpoint(a), final_checkpoint(b)
    assert sa["progress"] == sb["progress"]
    for name, tensor in sa["model"].items():
        assert torch.equal(tensor, sb["model"][name]), f"{name} differs"
    assert losses_by_step(a) == losses_by_step(b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ref")
    check(run_engine(JOB + [f"run.root={root}", "run.name=ref"], nproc=2))
    return root / "ref"


def start_torchrun(args: list[str], extra: list[str] = ()) -> subprocess.Popen:
    cmd = engine_command(args, 2, master_port=free_port(), torchrun_args=list(extra))
    return subprocess.Popen(cmd, env=engine_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, like a SLURM job step


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"job ended before step {step}: {proc.communicate()[1][-3000:]}"
        try:
            done = max(losses_by_step(run_dir), default=0)
        except (OSError, ValueError):
            done = 0
        if done >= step:
            return done
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


# The DataLoader path with worker processes: SIGTERM to the process group reaches the workers too.
# (Both paths produce bitwise the same run, so they share the reference.)
PATHS = {"device": [], "dataloader": ["data.device_resident=false", "data.num_workers=2"]}


@pytest.mark.parametrize("path", list(PATHS))
def test_sigterm_mid_epoch_saves_exits_75_and_resumes_bitwise_identical(reference, tmp_path, path):
    args = JOB + PATHS[path] + [f"run.root={tmp_path}", "run.name=job"]
    proc = start_torchrun(args)
    wait_for_step(tmp_path / "job", 15, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # what scancel / a preempting scheduler does
    out, err = proc.communicate(timeout=120)
    # torchrun's agent reports the signal it got, not the workers' exit 75; the save is what counts
    assert "preemption signal (SIGTERM) received: saving at step" in out, out[-2000:] + err[-3000:]
    assert "DataLoader worker" not in out + err, err[-3000:]  # no worker died of the signal
    (ckpt,) = [c for c in (tmp_path / "job" / "checkpoints").glob("*.pt")
               if torch.load(c, weights_only=True)["extra"]["reason"] == "preempt"]
    stopped = torch.load(ckpt, weights_only=True)["progress"]
    assert 15 <= stopped["step"] < 100 and stopped["step_in_epoch"] > 0  # mid-epoch
    check(run_engine(args, nproc=2))
    assert_same_run(reference, tmp_path / "job")


def test_sigkill_of_one_worker_under_max_restarts_resumes_identical(reference, tmp_path):
    args = JOB + [f"run.root={tmp_path}", "run.name=job"]
    proc = start_torchrun(args, ["--max-restarts=1"])
    wait_for_step(tmp_path / "job", 25, proc)
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in out and "resuming at step" in out
    assert_same_run(reference, tmp_path / "job")
    # the steps logged between the checkpoint and the kill were replayed: each is in metrics.jsonl once
    rows = read_jsonl(tmp_path / "job" / "metrics.jsonl")
    for kind in ("train/loss", "val/loss"):
        steps = [r["step"] for r in rows if kind in r]
        assert steps == sorted(set(steps)), (kind, steps)
    assert [r["step"] for r in rows if "train/loss" in r] == [
        r["step"] for r in read_jsonl(reference / "metrics.jsonl") if "train/loss" in r]


def test_dead_rank_without_restarts_ends_the_job_not_hangs(tmp_path):
    proc = start_torchrun(JOB + [f"run.root={tmp_path}", "run.name=job", "parallel.timeout_s=30"])
    wait_for_step(tmp_path / "job", 5, proc)
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
    proc.communicate(timeout=90)  # bounded: torchrun tears the group down
    assert proc.returncode != 0


@pytest.fixture
def ten_steps(tmp_path) -> Path:
    """A single-process run stopped (simulated preemption) at step 10 with checkpoints at 5 and 10."""
    args = JOB + [f"run.root={tmp_path}", "run.name=run", "checkpoint.every_steps=5", "train.max_steps=20",
                  "checkpoint.simulate_preempt_at_step=10"]
    check(run_engine(args), rc=75)
    return tmp_path / "run"


def resume_single(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_engine(JOB + [f"run.root={run_dir.parent}", f"run.name={run_dir.name}", "checkpoint.every_steps=5",
                             "train.max_steps=20", *extra])


@pytest.mark.parametrize("damage", ["truncate", "no_manifest"])
def test_damaged_newest_checkpoint_falls_back_to_previous_and_still_ends_identical(ten_steps, tmp_path, damage):
    clean = tmp_path / "clean"
    shutil.copytree(ten_steps, clean)
    newest = ten_steps / "checkpoints" / "step_00000010.pt"
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    else:
        newest.with_suffix(".json").unlink()
    proc = check(resume_single(ten_steps))
    assert "step_00000010.pt is unusable" in proc.stdout + proc.stderr
    assert "resuming at step 5" in proc.stdout
    check(resume_single(clean))
    assert_same_run(clean, ten_steps)


def test_all_checkpoints_damaged_is_a_clear_error(ten_steps):
    for pt in (ten_steps / "checkpoints").glob("*.pt"):
        pt.write_bytes(b"garbage")
    proc = resume_single(ten_steps)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("ddp_train: error: every checkpoint in")


def test_checkpoint_with_a_pickled_object_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    code = ("import os, torch\n"
            "class Evil:\n"
            f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
            f"torch.save({{'model': Evil()}}, {str(evil)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    proc = run_engine([str(CONFIGS / "cpu_smoke.yaml"), f"run.root={tmp_path}", f"checkpoint.resume={evil}"])
    assert proc.returncode == 2
    assert f"refused to load {evil}" in proc.stderr
    assert not marker.exists()


def test_verify_resume_reports_exact(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ddp_train.verify_resume", "--step", "7", "--root", str(tmp_path),
                           str(CONFIGS / "cpu_smoke.yaml"), "model.name=cnn_dropout", "train.max_steps=12"],
                          env=engine_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "interrupted after step 7/12: max |param diff| = 0 (bitwise equal: True); losses after step 7 match: True" \
        in proc.stdout


def ddp_train_cli(args: list[str]) -> subprocess.Popen:
    """`ddp-train --nproc-per-node 2 ...` (the front end that execs torchrun), in its own process group."""
    cmd = [sys.executable, "-m", "ddp_train.cli", "--nproc-per-node", "2", *args]
    return subprocess.Popen(cmd, env=engine_env(MASTER_PORT=str(free_port())), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.parametrize("shutdown_timeout, saved", [(3, False), (60, True)])
def test_torchrun_waits_parallel_shutdown_timeout_s_for_a_slow_preemption_save(tmp_path, shutdown_timeout, saved):
    """A preemption save that takes 6 s (fault injection) against torchrun's kill deadline, set through the
    config by ddp-train: 3 s kills the workers mid-save, 60 s lets them finish. The 6 s save also outlasts
    parallel.timeout_s=3: the other rank waits for it on the patient group, not the training timeout."""
    args = JOB + [f"run.root={tmp_path}", "run.name=job", "train.max_steps=400", "checkpoint.every_steps=null",
                  "checkpoint.simulate_slow_save_s=6", "parallel.timeout_s=3",
                  f"parallel.shutdown_timeout_s={shutdown_timeout}"]
    proc = ddp_train_cli(args)
    wait_for_step(tmp_path / "job", 10, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "preemption signal (SIGTERM) received: saving at step" in out, out[-2000:] + err[-3000:]
    preempted = [c for c in (tmp_path / "job" / "checkpoints").glob("*.pt")
                 if torch.load(c, weights_only=True)["extra"]["reason"] == "preempt"]
    assert bool(preempted) == saved, (out[-2000:], err[-3000:])
    if saved:
        assert "saved checkpoint" in out and "Timeout" not in err and "timed out" not in err, err[-3000:]
