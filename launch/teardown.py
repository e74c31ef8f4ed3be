"""What the job script runs after srun ends (submitit's teardown line; $? is srun's status), on the batch
node: when the attempt failed because of a node (faults.node_at_fault: a task killed by a signal or the OOM
killer, connection failures all naming one node) and --max-requeues allows, requeue the job without that
node and say so. A preemption (75) is rank 0's business inside the engine, a user error (2) or a crash of
our own code would fail again anywhere: those are left alone. Torch-free.

    python -m launch.teardown SRUN_STATUS FOLDER MAX_REQUEUES MIN_NODES
"""
from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from ddp_train import env
from ddp_train.errors import PREEMPTED_EXIT, USER_ERROR_EXIT

from .faults import failing_task, node_at_fault


def teardown_line(folder: Path, max_requeues: int, min_nodes: int) -> str:
    return " ".join([shlex.quote(sys.executable), "-u", "-m", "launch.teardown", '"$?"', shlex.quote(str(folder)),
                     str(max_requeues), str(min_nodes)])


def after_srun(rc: int, folder: Path, max_requeues: int, min_nodes: int) -> int:
    """Returns srun's status, so that sacct still shows how the attempt ended."""
    if rc in (0, USER_ERROR_EXIT, PREEMPTED_EXIT):
        return rc
    from .follow import node_addresses, task_logs  # submitit: only when there is something to read

    job = env.slurm_job_id()
    ntasks = int(env.getenv("SLURM_NTASKS") or "1")
    logs = task_logs(folder, job, ntasks)
    fault = node_at_fault(failing_task(logs), logs, node_addresses())
    if fault is None or _scontrol("show", "job", "-o", job).count("JobState=RUNNING") != 1:
        return rc  # not a node's fault, or the job is being cancelled / has timed out
    node, why = fault
    done = env.slurm_restarts()
    if done >= max_requeues:
        say(f"node {node} looks at fault ({why}); --max-requeues={max_requeues} reached, not requeueing job {job}: "
            f"resubmit with --exclude {node} (and the run's run.name to continue it)")
        return rc
    info = _scontrol("show", "job", "-o", job)
    excluded = set(_hostnames(_field(info, "ExcNodeList")))
    left = set(_hostnames(",".join(_partition_nodes(_field(info, "Partition"))))) - excluded - {node}
    if len(left) < min_nodes:
        say(f"node {node} looks at fault ({why}), but without it {len(left)} node(s) would be left for a job of "
            f"{min_nodes}: requeueing job {job} as it is ({done + 1}/{max_requeues})")
    else:
        excluded.add(node)
        say(f"node {node} looks at fault ({why}); requeueing job {job} without it (ExcNodeList="
            f"{','.join(sorted(excluded))}) ({done + 1}/{max_requeues})")
    requeue(job, sorted(excluded))
    return rc


def requeue(job: str, excluded: list[str]) -> None:
    """Requeue held, exclude, release: SLURM changes ExcNodeList of pending jobs only, and a held job cannot
    start on the bad node in between. requeuehold ends this job script: SIGTERM is ignored for the three
    calls (milliseconds; SIGKILL follows KillWait seconds later)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _scontrol("requeuehold", job, check=True)
    try:
        if excluded:
            _scontrol("update", f"JobId={job}", f"ExcNodeList={','.join(excluded)}", check=True)
    finally:
        _scontrol("release", job, check=True)


def say(text: str) -> None:
    print(f"launch.slurm: {text}", file=sys.stderr, flush=True)


def _scontrol(*args: str, check: bool = False) -> str:
    try:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        proc = subprocess.CompletedProcess(args, 1, "", str(e))
    if check and proc.returncode != 0:
        say(f"scontrol {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def _field(info: str, key: str) -> str:
    m = re.search(rf"\b{key}=(\S+)", info)
    return "" if not m or m[1] == "(null)" else m[1]


def _hostnames(nodelist: str) -> list[str]:
    return _scontrol("show", "hostnames", nodelist).split() if nodelist else []


def _partition_nodes(partition: str) -> list[str]:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"] + (["-p", partition] if partition else []),
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return sorted(set(out.split()))


def main(argv: list[str]) -> int:
    rc, folder, max_requeues, min_nodes = argv
    return after_srun(int(rc), Path(folder), int(max_requeues), int(min_nodes))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
