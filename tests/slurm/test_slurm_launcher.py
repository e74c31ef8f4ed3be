"""`python -m launch.slurm` and the sbatch templates against a real SLURM cluster on localhost (see
conftest.slurm_cluster): real sbatch/srun/scancel/sacct, real gloo between SLURM tasks, real requeue.
Every wait is bounded by a subprocess timeout or a deadline loop."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import (
    CONFIGS,
    MULTINODE,
    ROOT,
    Launch,
    final_checkpoint,
    job_field,
    job_rows,
    launcher,
    max_param_diff,
    max_step,
    only_run_dir,
    read_jsonl,
    slurm,
    train_losses,
    wait_for,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SMOKE = str(CONFIGS / "cpu_smoke.yaml")
# Long enough (250 CNN steps, ~5 s) to be signalled mid-run; W&B offline to check the run id survives.
PREEMPTIBLE = [SMOKE, "model.name=cnn", "train.epochs=2", "train.max_steps=250", "train.log_every_steps=10",
               "log.wandb.mode=offline"]
TWO_TASKS = ["--tasks-per-node", "2", "--time", "5"]


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, tmp_path_factory):
    """The uninterrupted 2-task job: test 1 checks its run directory, the preemption test compares to it."""
    from conftest import engine_env

    root = tmp_path_factory.mktemp("reference") / "runs"
    env = engine_env(SLURM_CONF=str(slurm_cluster), WANDB_MODE="offline")
    proc = launcher([*PREEMPTIBLE, f"run.root={root}", *TWO_TASKS, "--wait"], env)
    return proc, root


def test_two_task_cpu_job_trains_with_gloo_and_leaves_a_complete_run_dir(reference_run):
    proc, root = reference_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [(job_id, run_dir)] = job_rows(proc.stdout)
    assert run_dir == root / f"cpu_smoke-job{job_id}"  # the name the launcher predicted is the one the job used
    assert f"job {job_id}: COMPLETED" in proc.stdout
    assert "done: val/top1" in proc.stdout  # rank 0's log was streamed
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "train.log", "plots/confusion_matrix.csv",
                 "plots/curves.png", "wandb_id.txt"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["backend"], summary["step"]) == (2, "gloo", 250)
    assert final_checkpoint(run_dir)["progress"]["step"] == 250
    assert list((run_dir / "wandb").glob("offline-run-*"))


def submit_and_signal(root: Path, env: dict[str, str], *launcher_args: str) -> tuple[int, str, str, str]:
    """Launch with --wait, send USR2 once training is under way (step >= 30 of 250), wait for the end.
    Returns (launcher exit code, job id, stdout, stderr)."""
    cmd = [sys.executable, "-m", "launch.slurm", *PREEMPTIBLE, f"run.root={root}", *TWO_TASKS, "--wait",
           *launcher_args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, "WANDB_MODE": "offline"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        job_id = None
        deadline = time.time() + 60
        while job_id is None and time.time() < deadline:
            m = re.match(r"^  (\d+)  ", proc.stdout.readline())
            job_id = m and m[1]
        assert job_id, "the launcher printed no job id"
        metrics = root / f"cpu_smoke-job{job_id}" / "metrics.jsonl"
        while time.time() < deadline:
            if metrics.exists() and any(r.get("step", 0) >= 30 for r in read_jsonl(metrics)):
                break
            time.sleep(0.1)
        slurm(["scancel", "--signal=USR2", job_id], env)  # what SLURM sends before preemption/timeout
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, job_id, out, err


def test_preempted_job_saves_requeues_and_resumes_to_identical_weights(reference_run, slurm_env, tmp_path):
    ref_proc, ref_root = reference_run
    assert ref_proc.returncode == 0
    root = tmp_path / "runs"
    rc, job_id, out, err = submit_and_signal(root, slurm_env)
    assert rc == 0, out[-3000:] + err[-3000:]
    run_dir = only_run_dir(root)
    log = (run_dir / "train.log").read_text()
    assert "preemption signal (SIGUSR2) received" in log and "resuming at step" in log
    assert f"requeueing job {job_id}" in out + err
    restarts = slurm(["scontrol", "show", "job", job_id], slurm_env)
    assert "Restarts=1" in restarts, restarts

    ref_dir = only_run_dir(ref_root)
    ref, got = final_checkpoint(ref_dir), final_checkpoint(run_dir)
    assert got["progress"]["step"] == 250
    assert max_param_diff(ref["model"], got["model"]) == 0.0
    assert dict(train_losses(run_dir)) == dict(train_losses(ref_dir))
    # One W&B run across the requeue: every attempt's offline run carries the same id.
    wandb_id = (run_dir / "wandb_id.txt").read_text().strip()
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(a.name.endswith(wandb_id) for a in attempts), attempts


def test_a_job_out_of_requeues_keeps_its_checkpoint_and_says_how_to_continue(slurm_env, tmp_path):
    root = tmp_path / "runs"
    rc, job_id, out, err = submit_and_signal(root, slurm_env, "--max-requeues", "0")
    assert rc == 75, out[-2000:] + err[-2000:]
    assert "--max-requeues=0 reached, not requeueing" in out + err
    assert f"run.name=cpu_smoke-job{job_id} to continue it" in out + err
    assert re.search(rf"job {job_id} FAILED \(exit 75\): rank 0 .*more often than --max-requeues", err), err
    run_dir = only_run_dir(root)
    saved = final_checkpoint(run_dir)
    assert saved["extra"]["reason"] == "preempt" and 30 <= saved["progress"]["step"] < 250


def test_sweep_is_one_job_array_and_a_preempted_element_is_requeued_alone(slurm_env, tmp_path):
    """The requeue names ARRAY_JOB_ID_TASK_ID, never the whole array (Lightning #15022): USR2 to element 0
    requeues and resumes element 0 only; element 1 runs once, undisturbed."""
    root = tmp_path / "runs"
    launch = Launch([*MULTINODE, f"run.root={root}", "--sweep", "optim.lr=0.05,0.02", "--tasks-per-node", "1",
                     "--time", "5"], slurm_env)
    rows = launch.rows(2)
    (first, first_dir), (second, second_dir) = rows
    assert first.split("_")[0] == second.split("_")[0] and (first[-2:], second[-2:]) == ("_0", "_1")  # one array
    wait_for("element 0 at step 30", lambda: max_step(first_dir) >= 30, 90)
    slurm(["scancel", "--signal=USR2", first], slurm_env)
    assert launch.finish(timeout=180) == 0, launch
    assert f"job {first}: COMPLETED" in launch.stdout and f"job {second}: COMPLETED" in launch.stdout, launch
    assert (job_field(first, "Restarts", slurm_env), job_field(second, "Restarts", slurm_env)) == ("1", "0")
    lrs, groups = [], set()
    for run_dir in (first_dir, second_dir):
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        lrs.append(cfg["optim"]["lr"])
        groups.add(cfg["log"]["wandb"]["group"])
        assert json.loads((run_dir / "summary.json").read_text())["step"] == 120
    assert lrs == [0.05, 0.02]
    assert len(groups) == 1 and groups.pop().startswith("cpu_smoke-sweep-")
    logs = [(d / "train.log").read_text() for d in (first_dir, second_dir)]
    assert "preemption signal (SIGUSR2) received" in logs[0] and "resuming at step" in logs[0]
    assert logs[1].count("ranks per host:") == 1 and "preemption" not in logs[1] and "resuming" not in logs[1]


def test_single_node_sbatch_template_runs_via_plain_sbatch(slurm_env, tmp_path):
    root = tmp_path / "runs"
    job_id = slurm(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", f"--output={tmp_path}/%j.out",
                    "--export=ALL,NPROC=2", str(ROOT / "slurm" / "single_node.sbatch"), SMOKE, f"run.root={root}"],
                   slurm_env).strip()
    deadline, state = time.time() + 120, ""
    while time.time() < deadline:  # (sbatch --wait polls too slowly: ~30 s after the job ended)
        state = slurm(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode"], slurm_env).strip()
        if state and state.split("|")[0] not in ("PENDING", "RUNNING", "COMPLETING"):
            break
        time.sleep(0.5)
    logs = "".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert state == "COMPLETED|0:0", state + "\n" + logs
    summary = json.loads((root / f"cpu_smoke-job{job_id}" / "summary.json").read_text())
    assert (summary["world_size"], summary["step"]) == (2, 20)


def test_failed_job_is_triaged_with_rank_reason_and_log_lines(slurm_env, tmp_path):
    # Passes preflight, fails inside the job: no MNIST files under data.root and downloads are off.
    proc = launcher([SMOKE, f"run.root={tmp_path / 'runs'}", "data.name=mnist", f"data.root={tmp_path / 'no_data'}",
                     "data.download=false", *TWO_TASKS, "--wait"], slurm_env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    triage = proc.stderr
    assert re.search(r"job \d+ FAILED \(exit 2\): rank 0 .*configuration or input error", triage), triage
    assert "last lines of rank 0" in triage and "ddp_train: error:" in triage and "no_data" in triage


@pytest.mark.parametrize("bad, message", [
    (["--gpus-per-node", "2", "--tasks-per-node", "3"], "--tasks-per-node 3 != --gpus-per-node 2"),
    (["--tasks-per-node", "3"], "does not divide by world size 3"),
    (["--partition", "nope"], "--partition nope: no such partition; this cluster has debug, high"),
    (["optim.lr_typo=1"], "unknown config key 'optim.lr_typo'"),
    (["--sweep", "optim.lr=1e-3,oops"], "optim.lr"),
    (["--signal-delay", "10"], "--signal-delay 10s is too short: the last checkpoint save took 30 s"),
])
def test_preflight_rejects_a_bad_request_with_one_line_and_submits_nothing(slurm_env, tmp_path, bad, message):
    root = tmp_path / "runs"
    (root / "earlier-run").mkdir(parents=True)  # a measured save time preflight must respect
    (root / "earlier-run" / "summary.json").write_text(json.dumps({"checkpoint_save_s": 30.0}))
    before = slurm(["sacct", "-X", "-n", "-P", "-o", "JobID", "-S", "now-1hours"], slurm_env)
    proc = launcher([SMOKE, f"run.root={root}", *bad], slurm_env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch.slurm: error:") and message in lines[0], proc.stderr
    assert slurm(["sacct", "-X", "-n", "-P", "-o", "JobID", "-S", "now-1hours"], slurm_env) == before
    assert not (root / "slurm_logs").exists()


def test_a_request_sbatch_refuses_ends_with_exit_2_and_its_reason(slurm_env, tmp_path):
    proc = launcher([SMOKE, f"run.root={tmp_path / 'runs'}", "--mem", "9999999G"], slurm_env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("launch.slurm: error: sbatch refused the job: sbatch: error: "
                                                   "Batch job submission failed: Requested node configuration is "
                                                   "not available")
