"""Knowing what a job does, on real torchrun jobs: a rank frozen with SIGSTOP is named by the hang
sentinel and the job ends with HUNG_EXIT well before the collective timeout; a rank slowed by its own
input pipeline is named as the straggler; a real blow-up (SGD at lr 1e4 on the MLP) is skipped, rolled
back and then ends the job with DIVERGED_EXIT; TensorBoard events and profiler traces read back."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    CONFIGS,
    check,
    engine_env,
    free_port,
    read_jsonl,
    run_engine,
    skewed_rank_env,
    worker_exit_codes,
    worker_pids,
    write_user_project,
)

from ddp_train.config.argv import engine_command
from launch.follow import hang_lines

pytestmark = pytest.mark.slow
SMOKE = str(CONFIGS / "cpu_smoke.yaml")


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """Two ranks, rank 1's dataset 2 ms slower per sample; TensorBoard on; steps 3-4 profiled on both."""
    root = write_user_project(tmp_path_factory.mktemp("observed"))
    args = [SMOKE, "model.name=quads.nets:small_cnn", "data.name=quads.data:rank_slow_quadrants",
            "data.kwargs.delay_s=0.002", "data.num_workers=0", "train.epochs=3", "train.max_steps=40", "train.log_every_steps=4",
            "log.tensorboard=true", "profile.steps=[3,4]", "profile.ranks=[0,1]", f"run.root={root / 'runs'}",
            "run.name=obs"]
    proc = check(run_engine(args, nproc=2, cwd=root))
    return root / "runs" / "obs", proc


def test_the_slow_rank_is_named_in_metrics_summary_and_one_warning(observed):
    run, proc = observed
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "sys/slowest_rank" in r]
    assert len(rows) == 10 and all(r["sys/slowest_host"] for r in rows)
    named = [r for r in rows if r["sys/slowest_rank"] == 1]  # 2 CPUs under load: allow a noisy window
    assert len(named) >= 8, rows
    assert sorted(r["sys/slowest_ratio"] for r in named)[len(named) // 2] > 1.5  # over the others' median
    assert proc.stdout.count("straggler: rank 1 on") == 1  # warned once, not every interval
    # The console's short line names the slow rank where it is over log.straggler_factor (1.5), and leaves
    # the sys/* set to metrics.jsonl.
    lines = [ln for ln in (run / "train.log").read_text().splitlines() if re.search(r"epoch \d+ \| step \d+ \| loss ", ln)]
    assert len(lines) == 10 and not any("sys/" in ln or "train/" in ln for ln in lines), lines
    for row, line in zip(rows, lines):  # the same intervals, in order
        named_here = re.search(rf"\| slowest rank {row['sys/slowest_rank']} \(\S+\) \d+\.\dx$", line)
        assert bool(named_here) == (row["sys/slowest_ratio"] >= 1.5), (row, line)
    table = json.loads((run / "summary.json").read_text())["per_rank"]
    assert [t["rank"] for t in table] == [0, 1] and all(t["steps"] == 40 for t in table)
    assert table[1]["own_s_per_step"] > 1.5 * table[0]["own_s_per_step"], table
    assert table[1]["data_wait_s"] > 40 * 16 * 0.002 * 0.9  # 40 steps x 16 samples x 2 ms, at least


def test_flops_and_throughput_are_logged(observed):
    run, _ = observed
    summary = json.loads((run / "summary.json").read_text())
    # small_cnn (width 8) on 1x12x12: conv 2*9*8*144 + linear 2*288*4 = 23,040 forward FLOPs per sample
    assert summary["flops_forward_per_sample"] == pytest.approx(23040, rel=0.1)
    # training = forward + backward (2x forward), less the input gradient of the first layer nobody needs
    assert summary["flops_per_sample"] == pytest.approx(3 * 23040 - 20736, rel=0.1)
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "perf/tflops_per_device" in r]
    assert rows and all(r["perf/tflops_per_device"] > 0 for r in rows)
    assert "perf/mfu" not in rows[0]  # no peak on a CPU unless train.peak_tflops says one


def test_tensorboard_events_hold_the_same_metrics(observed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = observed
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    logged = {r["step"]: r["train/loss"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r}
    got = {e.step: e.value for e in events.Scalars("train/loss")}
    assert got.keys() == logged.keys()
    assert all(got[s] == pytest.approx(logged[s], rel=1e-6) for s in logged)
    assert "val/top1" in events.Tags()["scalars"] and "summary/val/top1" in events.Tags()["scalars"]


def test_the_profiled_steps_leave_a_chrome_trace_and_a_top_ops_table(observed):
    run, proc = observed
    for rank in (0, 1):
        trace = json.loads((run / "profile" / f"trace_rank{rank}.json").read_text())
        names = {e.get("name", "") for e in trace["traceEvents"]}
        assert any(n.startswith("aten::") for n in names), sorted(names)[:20]
        assert "Self CPU" in (run / "profile" / f"top_ops_rank{rank}.txt").read_text()
    assert "profile of steps 3-4 (rank 0)" in proc.stdout


def test_a_stopped_rank_is_named_and_the_job_ends_hung_within_the_hang_timeout(tmp_path):
    args = [SMOKE, "train.max_steps=null", "train.epochs=1000", "train.log_every_steps=5",
            "parallel.hang_timeout_s=10", f"run.root={tmp_path}", "run.name=hang"]
    proc = subprocess.Popen(engine_command(args, 2, master_port=free_port()), env=engine_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    run = tmp_path / "hang"
    try:
        deadline = time.time() + 120
        while not any(r.get("step", 0) >= 20 for r in _rows(run)):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        rank1 = worker_pids(proc.pid)[1]
        reached = max(r["step"] for r in _rows(run))
        time.sleep(3)  # a few heartbeats (one a second at hang_timeout_s=10) after that step
        os.kill(rank1, signal.SIGSTOP)  # frozen: it cannot dump its own stack or say anything
        stopped_at = time.time()
        report = run / "hang" / "report.txt"
        while not report.exists():
            assert time.time() - stopped_at < 10 + 20, "no hang report within hang_timeout_s + 20 s"
            time.sleep(0.2)
        found_after = time.time() - stopped_at
        time.sleep(1)
        os.kill(rank1, signal.SIGKILL)  # what the scheduler does next; torchrun otherwise waits 30 s on it
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = report.read_text()
    behind = [ln for ln in text.splitlines() if ln.startswith("behind:")]
    assert len(behind) == 1 and behind[0].startswith("behind: rank 1 on ") and "not responding" in behind[0], text
    step, waiting = map(int, re.search(r"at step (\d+).*the others wait after step (\d+)", behind[0]).groups())
    assert reached <= step <= waiting, (reached, step, waiting)  # its last heartbeat, at most a second old
    stacks = (run / "hang" / "rank0.txt").read_text()
    assert "rank0.txt" in text and "Thread" in stacks and "in fit" in stacks, stacks  # the main thread's stack
    assert not (run / "hang" / "rank1.txt").exists()
    assert worker_exit_codes(err)[-1:] == [4] or 4 in worker_exit_codes(err), err[-2000:]
    assert found_after < 30 and "hang: rank 0 saw no training step" in out  # not the 600 s collective timeout
    lines = hang_lines({0: out})  # what launch.slurm --wait prints from the same log and report
    assert lines and "rank 1 on" in lines[0] and str(report) in lines[0]


def test_a_real_blow_up_is_skipped_rolled_back_once_then_ends_diverged(tmp_path):
    # SGD with lr ramping to 1e4: finite for the first steps, then inf/NaN gradients
    args = [SMOKE, "model.name=mlp", "optim.name=sgd", "optim.lr=1e4", "sched.name=constant", "train.epochs=2",
            "sched.warmup_steps=100000", "train.max_steps=200", "checkpoint.every_steps=5", "checkpoint.keep_last=2",
            "train.log_every_steps=5", "train.max_bad_steps=3", f"run.root={tmp_path}", "run.name=nan"]
    # rank 1 is 3 s slower to exit: rank 0's exit gets it SIGTERMed while it winds down, and it must
    # still end with the agreed code, not die of the signal (-15)
    proc = run_engine(args, nproc=2, env=skewed_rank_env(tmp_path, rank=1, seconds=3, at="exit"))
    assert proc.returncode != 0 and worker_exit_codes(proc.stderr) == [3, 3], proc.stderr[-3000:]
    rolled = re.search(r"non-finite gradient norm at steps (\d+)-(\d+) \(3 in a row\): rolled back to step (\d+)",
                       proc.stdout)
    assert rolled, proc.stdout[-3000:]
    first_bad, back_to = int(rolled[1]), int(rolled[3])
    assert back_to < first_bad and back_to % 5 == 0  # the newest checkpoint before the streak began
    died = [ln for ln in proc.stdout.splitlines() if ln.startswith("diverged: ")]
    assert len(died) == 1 and "again after rolling back to step" in died[0] and "lower optim.lr" in died[0]
    rows = read_jsonl(tmp_path / "nan" / "metrics.jsonl")
    steps = [r["step"] for r in rows if "train/lr" in r]
    assert steps == sorted(set(steps))  # the rows after the rollback's checkpoint were replayed, once
    assert max(r.get("train/skipped_steps", 0) for r in rows) >= 3


def _rows(run: Path) -> list[dict]:
    try:
        return read_jsonl(run / "metrics.jsonl")
    except (OSError, ValueError):
        return []
