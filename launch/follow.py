"""--wait: follow submitted jobs through requeues until they end, stream rank 0's log, and when a job
fails say which rank failed, why (exit code/signal/state in words) and show its last log lines."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from submitit.core.utils import JobPaths

from .faults import (
    exit_code_of,
    failing_rank,  # noqa: F401  (re-exported: the triage API as it was)
    failing_task,
    node_at_fault,
    parse_node_addresses,
)

ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "SPECIAL_EXIT"}


@dataclass
class JobStatus:
    state: str
    exit_code: int = 0
    signal: int = 0


def status(job_id: str) -> JobStatus:
    """sacct knows ended jobs (needs accounting); squeue knows queued/running ones."""
    proc = _run(["squeue", "-h", "-j", job_id, "-o", "%T"])
    if proc and proc.returncode == 0 and proc.stdout.strip():
        return JobStatus(proc.stdout.split()[0])
    proc = _run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode"])
    for line in (proc.stdout.splitlines() if proc and proc.returncode == 0 else []):
        jid, state, code = (line.split("|") + ["", "", ""])[:3]
        if jid == job_id:
            rc, _, sig = code.partition(":")
            return JobStatus(state.split()[0], int(rc or 0), int(sig or 0))
    return JobStatus("UNKNOWN")


def _run(cmd: list[str]) -> subprocess.CompletedProcess | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None


def node_addresses() -> dict[str, str]:
    """Every node's name, hostname and address -> its name (for connection errors that name an address)."""
    proc = _run(["scontrol", "show", "node", "-o"])
    return parse_node_addresses(proc.stdout) if proc and proc.returncode == 0 else {}


def explain(st: JobStatus) -> str:
    """The exit reason in words, with the usual fix."""
    if st.state == "OUT_OF_MEMORY" or st.exit_code in (137, -9) or st.signal == 9:
        return "killed (SIGKILL / 137), probably out of memory: raise --mem or lower train.global_batch_size"
    if st.state == "TIMEOUT":
        return "hit the --time limit before finishing and was not requeued: raise --time or --max-requeues"
    if st.state == "CANCELLED":
        return "cancelled (scancel, or preempted with no requeue)"
    if st.state in ("NODE_FAIL", "BOOT_FAIL"):
        return "a node failed: resubmit; the run resumes from its last checkpoint"
    if st.exit_code == 75:
        return "preempted/timed out more often than --max-requeues allows: resubmit to resume from the checkpoint"
    if st.exit_code == 2:
        return "a configuration or input error (the one-line error above names it)"
    if st.exit_code == 3:
        return "diverged: non-finite gradients again after a rollback (the line above says where; lower optim.lr)"
    if st.exit_code == 4:
        return "hung: no training step within parallel.hang_timeout_s (hang/report.txt names the ranks behind)"
    if st.exit_code == 1:
        return "a Python exception (traceback above)"
    if st.signal:
        return f"killed by signal {st.signal}"
    return f"exit code {st.exit_code}"


def task_logs(folder: Path, job_id: str, ntasks: int) -> dict[int, str]:
    logs = {}
    for rank in range(ntasks):
        paths = JobPaths(folder, job_id=job_id, task_id=rank)
        text = ""
        for path in (paths.stderr, paths.stdout):
            if path.exists():
                text += path.read_text(errors="replace")
        logs[rank] = text
    return logs


def triage(folder: Path, job_id: str, ntasks: int, st: JobStatus, tail: int = 15) -> tuple[str, int]:
    """(the explanation, the exit code the launcher should return: the failing rank's)."""
    logs = task_logs(folder, job_id, ntasks)
    failure = failing_task(logs)
    rank, words = failure.rank, failure.words
    st = JobStatus(st.state, exit_code_of(words, st.exit_code), st.signal)
    lines = [f"launch.slurm: job {job_id} {st.state} (exit {st.exit_code}"
             + (f", signal {st.signal}" if st.signal else "") + f"): rank {rank}"
             + (f" on {failure.host}" if failure.host else "") + (f" ({words})" if words else "")
             + f" -- {explain(st)}"]
    lines += hang_lines(logs)
    fault = node_at_fault(failure, logs, node_addresses())
    if fault:
        lines.append(f"launch.slurm: node {fault[0]} looks at fault ({fault[1]}): resubmit with --exclude {fault[0]}")
    paths = JobPaths(folder, job_id=job_id, task_id=rank)
    own = [ln for ln in logs.get(rank, "").splitlines() if ln.strip() and "submitit" not in ln]
    lines.append(f"last lines of rank {rank} ({paths.stderr}):")
    lines += [f"  {ln}" for ln in own[-tail:]]
    return "\n".join(lines), st.exit_code


HANG_LINE = re.compile(r"stacks and report in (\S+), exiting with code")


def hang_lines(logs: dict[int, str]) -> list[str]:
    """The hang sentinel's verdict: the 'behind:' lines of the report a rank named in its log."""
    for text in logs.values():
        m = HANG_LINE.search(text)
        if m:
            report = Path(m[1]) / "report.txt"
            try:
                behind = [ln for ln in report.read_text().splitlines() if ln.startswith("behind:")]
            except OSError:
                return [f"launch.slurm: hang detected; no report at {report}"]
            return [f"launch.slurm: hang: {ln[len('behind: '):]} (report: {report})" for ln in behind]
    return []


class Tail:
    """Prints what was appended to a set of files since the last call (submitit appends across requeues)."""

    def __init__(self, paths: list[Path]):
        self.offsets = {p: 0 for p in paths}

    def pump(self, out) -> None:
        for path, offset in self.offsets.items():
            if not path.exists():
                continue
            with open(path, errors="replace") as f:
                f.seek(offset)
                chunk = f.read()
            cut = chunk.rfind("\n") + 1  # whole lines only
            if cut:
                out.write(chunk[:cut])
                out.flush()
                self.offsets[path] = offset + cut


def follow(jobs: list, folder: Path, ntasks: int, stream: bool, poll_s: float = 1.0,
           timeout_s: float | None = None, out=sys.stdout) -> int:
    """Wait for every job to end. 0 when all completed; else the failed job's exit code (1 if none)."""
    tail = None
    if stream and len(jobs) == 1:
        paths = JobPaths(folder, job_id=jobs[0].job_id, task_id=0)
        tail = Tail([paths.stdout, paths.stderr])
    last: dict[str, str] = {}
    final: dict[str, JobStatus] = {}
    deadline = None if timeout_s is None else time.time() + timeout_s
    while len(final) < len(jobs):
        if tail:  # the log first: it explains the state change printed next
            tail.pump(out)
        for job in jobs:
            if job.job_id in final:
                continue
            st = status(job.job_id)
            if st.state != last.get(job.job_id):
                print(f"launch.slurm: job {job.job_id}: {st.state}", file=out, flush=True)
                last[job.job_id] = st.state
            if st.state in ENDED:
                final[job.job_id] = st
        if len(final) < len(jobs):
            if deadline and time.time() > deadline:
                print(f"launch.slurm: stopped waiting after {timeout_s:.0f} s; the jobs keep running", file=out)
                return 1
            time.sleep(poll_s)
    if tail:
        tail.pump(out)
    failed = {j: st for j, st in final.items() if st.state != "COMPLETED"}
    codes = []
    for job_id, st in failed.items():
        text, code = triage(folder, job_id, ntasks, st)
        print(text, file=sys.stderr, flush=True)
        codes.append(code)
    return (codes[0] or 1) if codes else 0
