"""`python -m ddp_train.doctor` as users run it, a real process: the table on a job that will work (exit 0,
the throughput verdict with both numbers), and on one that will not (exit 2, the failing check and its
fix)."""
from __future__ import annotations

import re
import subprocess
import sys

from conftest import CONFIGS, ROOT, check, engine_env

ROWS = ["python", "torch", "cuda", "nccl", "gpus", "/dev/shm", "rendezvous port", "hostname", "run root", "disk", "dataset",
        "batches per rank", "signal delay", "throughput"]


def doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddp_train.doctor", *args], cwd=ROOT, env=engine_env(),
                          capture_output=True, text=True, timeout=120)


def test_doctor_on_a_job_that_works_and_on_one_that_does_not(tmp_path):
    proc = check(doctor(str(CONFIGS / "cpu_smoke.yaml"), "--nproc-per-node", "2", f"run.root={tmp_path / 'runs'}",
                        "--seconds", "1"))
    rows = {line[8:].split("  ")[0].strip(): line[:6].strip() for line in proc.stdout.splitlines()[1:-1]
            if not line.startswith(" ")}
    assert list(rows) == ROWS and "fail" not in rows.values(), proc.stdout
    assert re.search(r"(input|compute)-bound: loader \d+ samples/s vs model \d+ samples/s per rank", proc.stdout)
    assert "2 ranks x 125 steps per epoch" in proc.stdout  # 4000 digits, global batch 32
    assert (tmp_path / "runs").is_dir()  # the engine's writable check made it

    bad = check(doctor(str(CONFIGS / "cpu_smoke.yaml"), "data.name=imagefolder", "data.root=/nonexistent",
                       f"run.root={tmp_path / 'runs'}"), rc=2)
    lines = bad.stdout.splitlines()
    failed = next(i for i, line in enumerate(lines) if line.startswith("fail    dataset"))
    assert "/nonexistent/train" in lines[failed] and "fix:" in lines[failed + 1] and "data.root" in lines[failed + 1]
    from ddp_train.doctor_checks import WARN, python_fork

    warns = 2 + (python_fork(tuple(sys.version_info[:3])).status == WARN)  # a Python with the fork deadlock
    assert lines[-1].endswith(f"1 fail, {warns} warn")  # /dev/shm and throughput: not measured without the data
