"""What ended a job attempt, read from its task logs: the task srun reports first (the cause), its rank, its
node and srun's words for it; and whether a node is at fault: a task killed by a signal the job's own life
cycle does not send (the OOM killer's SIGKILL, a bus error) or its connections failing towards one node.
Text in, verdict out: follow (--wait) and teardown (the job script after srun) ask SLURM, this does not."""
from __future__ import annotations

import re
import signal
from dataclasses import dataclass

SRUN_TASK = re.compile(r"srun: error: (?P<host>\S+): tasks? (?P<tasks>[\d,\-]+): (?P<what>.+)")
# Sent by scancel, preemption, time limits and --kill-on-bad-exit: the job's own life, not the node's fault.
LIFECYCLE_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT}
_SIGNAL_WORDS = {signal.strsignal(s): int(s) for s in signal.Signals}  # srun prints strsignal(): "Killed" -> 9
# gloo ("Connection closed by peer [10.0.0.2]:4242", "connectFullMesh failed"), NCCL ("remote process exited
# or there was a network error", "Connection closed by remote peer gpu08<43120>"), sockets in general.
CONNECTION = re.compile(r"Connection (?:closed|reset|refused)|connectFullMesh|ncclRemoteError|remote process "
                        r"exited|network error|Socket Timeout|No route to host|Broken pipe", re.I)


@dataclass(frozen=True)
class Failure:
    rank: int
    words: str | None = None  # srun's words for the cause: "Killed", "Exited with exit code 2", ...
    host: str | None = None  # the node srun named for that task


def failing_task(logs: dict[int, str]) -> Failure:
    """The first task srun reports is the cause: the others were then ended by --kill-on-bad-exit
    ("Terminated") or failed on broken collectives, which is noise. A signal there (killed, out of memory)
    names that rank. A task that exited with a code is named unless its log is silent: an error every rank
    raised alike is printed by rank 0 alone, so the lowest rank that printed an error of its own is named
    instead. Without srun's reports: the lowest rank with an error, else 0."""
    events: list[tuple[list[int], str, str]] = []
    for text in logs.values():
        events = [(_ranks(m["tasks"]), m["what"].strip(), m["host"].rstrip(":")) for m in SRUN_TASK.finditer(text)]
        if events:
            break
    own_error = [rank for rank in sorted(logs) if _has_own_error(logs[rank])]
    if not events:
        return Failure(own_error[0] if own_error else 0)
    what = events[0][1]
    host_of = {r: host for rs, w, host in events for r in rs}
    ranks = [r for rs, w, _ in events if w == what for r in rs]  # every task that ended the same way
    sig = signal_of(what)
    if "Killed" in what or "signal" in what or "Out Of Memory" in what or (sig and sig not in LIFECYCLE_SIGNALS):
        rank = min(ranks)
    else:
        rank = next((r for r in sorted(ranks) if r in own_error), own_error[0] if own_error else min(ranks))
    return Failure(rank, what, host_of.get(rank))


def failing_rank(logs: dict[int, str]) -> tuple[int, str | None]:
    """(rank, srun's words for it): see failing_task."""
    f = failing_task(logs)
    return f.rank, f.words


def signal_of(words: str | None) -> int | None:
    """srun's 'Killed' / 'Segmentation fault (core dumped)' -> 9 / 11; None for anything else."""
    return _SIGNAL_WORDS.get(re.sub(r"\s*\(core dumped\)\s*$", "", (words or "").strip()))


def exit_code_of(words: str | None, default: int) -> int:
    """srun's 'Exited with exit code N' -> N, a signal -> 128 + its number (as a shell reports it): the
    cause's code, not the one the killed rest left in sacct."""
    m = re.search(r"exit code (\d+)", words or "")
    if m:
        return int(m[1])
    sig = signal_of(words)
    return 128 + sig if sig else default


def connection_peers(text: str, addresses: dict[str, str]) -> set[str]:
    """The nodes named (by name, hostname or address) on lines of `text` that report a failed connection."""
    peers = set()
    for line in text.splitlines():
        if CONNECTION.search(line):
            peers |= {addresses[t] for t in re.findall(r"[\w.\-]+", line) if t in addresses}
    return peers


def node_at_fault(failure: Failure, logs: dict[int, str], addresses: dict[str, str]) -> tuple[str, str] | None:
    """(node, why) when the attempt points at one node, else None (a bug, a config error, a cancellation:
    another node would not help). `addresses` maps each node's name, hostname and address to its name."""
    r, host, words = failure.rank, failure.host, failure.words
    if host and words:
        if "Out Of Memory" in words:
            return host, f"rank {r} on {host}: out of memory"
        sig = signal_of(words)
        if sig and sig not in LIFECYCLE_SIGNALS:
            return host, f"rank {r} on {host}: {words} (signal {sig})"
    peers = connection_peers(logs.get(r, ""), addresses) - {host}
    if len(peers) == 1:
        node = peers.pop()
        return node, f"rank {r}{f' on {host}' if host else ''} lost its connection to {node}"
    return None


def parse_node_addresses(scontrol_show_node: str) -> dict[str, str]:
    """`scontrol show node -o` -> {NodeName, NodeAddr, NodeHostName: NodeName} for every node."""
    out = {}
    for line in scontrol_show_node.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        name = fields.get("NodeName")
        if name:
            out.update({v: name for v in (name, fields.get("NodeAddr"), fields.get("NodeHostName")) if v})
    return out


def _has_own_error(text: str) -> bool:
    own = "\n".join(ln for ln in text.splitlines() if not ln.startswith(("srun:", "slurmstepd")))
    return "Traceback" in own or "error:" in own or "launch.slurm:" in own  # (the requeue verdict is rank 0's)


def _ranks(spec: str) -> list[int]:
    """srun's '0-1,3' -> [0, 1, 3]."""
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out
