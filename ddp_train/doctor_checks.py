"""The doctor's checks that need no torch: each takes plain numbers (or a path) and returns a Check, ok /
warn / fail with the fix in one line. `python -m ddp_train.doctor` prints them in a table; launch.preflight
runs the login-node subset (run root, disk, signal delay) before it submits. Torch-free."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .netcheck import loopback_problem
from .rundir.naming import ensure_writable

OK, WARN, FAIL = "ok", "warn", "fail"
SAVE_MARGIN = 2.0  # the signal delay must cover a step still in flight plus the save, under load
DROPPED_WARN = 0.10  # of the training split left out of every epoch by the incomplete last global batch


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # not reached


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else ('es' if word.endswith('s') else 's')}"


def _split_fix(message: str) -> tuple[str, str]:
    """'problem; fix' (how the engine's one-line errors read) -> (problem, fix)."""
    problem, sep, fix = message.rpartition("; ")
    return (problem, fix) if sep else (message, "")


# ---------------------------------------------------------------------------- python
# CPython gh-112275: a child forked while another thread holds the runtime's HEAD_LOCK deadlocks in
# os.fork() before it runs a line. Fixed in 3.11.8 and in the 3.10 branch's September 2024 release; 3.12 never
# had it. The first version with the fix, per affected minor version.
FORK_DEADLOCK_FIXED = {(3, 10): (3, 10, 15), (3, 11): (3, 11, 8)}


def python_fork(version: tuple[int, int, int]) -> Check:
    """Warns on a Python whose os.fork() can deadlock while other threads run: the engine forks its own
    DataLoader workers before training starts, but a DataLoader the user's code creates mid-run cannot."""
    shown = ".".join(map(str, version[:3]))
    fixed = FORK_DEADLOCK_FIXED.get(tuple(version[:2]))
    if fixed is None or tuple(version[:3]) >= fixed:
        return Check("python", OK, f"Python {shown}")
    return Check("python", WARN,
                 f"Python {shown} can deadlock in os.fork() while other threads run (CPython gh-112275): a "
                 f"DataLoader with workers created while training runs (in your own code: a callback, an extra "
                 f"evaluation loader) can hang on a worker that never starts; the engine's own are forked first",
                 f"Python >= {'.'.join(map(str, fixed))} (or 3.12+), or multiprocessing_context='forkserver' for "
                 f"the DataLoaders your code creates")


# ---------------------------------------------------------------------------- run root and disk
def run_root(root: Path) -> Check:
    """The engine's own check (it creates the directory and writes a probe file)."""
    try:
        ensure_writable(root, f"run.root={root}", "the run root")
    except UserError as e:
        return Check("run root", FAIL, *_split_fix(str(e)))
    return Check("run root", OK, f"{root.resolve()} is writable")


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds `path` (or would: its nearest existing parent)."""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def checkpoint_bytes(param_bytes: int, buffer_bytes: int, optimizer: str, momentum: float, ema: bool) -> int:
    """One checkpoint: the weights, the optimizer's per-parameter state (Adam/AdamW keep two moments,
    SGD one momentum buffer), an EMA copy, and the buffers (BatchNorm statistics)."""
    slots = 2 if optimizer in ("adam", "adamw") else (1 if momentum else 0)
    return param_bytes * (1 + slots + int(ema)) + buffer_bytes


def measured_checkpoint_bytes(root: Path) -> tuple[int, Path] | None:
    """The newest checkpoint already written under run.root (a .pt file or an FSDP .dcp directory): its
    size, without torch, for the login node."""
    found = [p for p in root.glob("*/checkpoints/step_*") if p.suffix in (".pt", ".dcp")] if root.is_dir() else []
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        return sum(f.stat().st_size for f in files), path
    return None


def disk_space(root: Path, copies: int, ckpt_bytes: int | None, free: int | None = None,
               source: str = "estimated") -> Check:
    """Room for `copies` checkpoints (keep_last + keep_best, plus the one being written before the oldest
    is pruned); warns below twice that (metrics, logs, a filesystem others share)."""
    free = free_bytes(root) if free is None else free
    if not ckpt_bytes:
        return Check("disk", OK, f"{size(free)} free under {root} (checkpoint size unknown)")
    need = copies * ckpt_bytes
    detail = f"{size(free)} free, checkpoints need {copies} x {size(ckpt_bytes)} = {size(need)} ({source})"
    fix = "free space there, lower checkpoint.keep_last, or put run.root on a larger filesystem"
    if free < need:
        return Check("disk", FAIL, detail, fix)
    if free < 2 * need:
        return Check("disk", WARN, detail + ": little headroom", fix)
    return Check("disk", OK, detail)


# ------------------------------------------------------------------------------------- /dev/shm
def shm_free(path: str = "/dev/shm") -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def shm(free: int | None, procs: int, workers: int, prefetch: int, batch_bytes: int) -> Check:
    """DataLoader workers hand batches to their rank through /dev/shm: every worker keeps `prefetch`
    batches there, on every rank of the node."""
    if workers == 0:
        return Check("/dev/shm", OK, "not used: no DataLoader workers (device-resident data or num_workers=0)")
    if free is None:
        return Check("/dev/shm", WARN, "no /dev/shm here: DataLoader workers cannot share batches",
                     "mount a tmpfs at /dev/shm (docker run --shm-size=8g), or data.num_workers=0")
    need = procs * workers * prefetch * batch_bytes
    detail = (f"{size(free)} free; {plural(procs, 'rank')} x {plural(workers, 'worker')} x {prefetch} prefetched x "
              f"{size(batch_bytes)} batches = {size(need)}")
    fix = ("enlarge /dev/shm (docker run --shm-size=8g or --ipc=host; Kubernetes: an emptyDir with medium Memory) "
           "or lower data.num_workers; too small a /dev/shm ends in 'Bus error' (pytorch #5040)")
    if free < need:
        return Check("/dev/shm", FAIL, detail, fix)
    if free < 2 * need:
        return Check("/dev/shm", WARN, detail + ": little headroom", fix)
    return Check("/dev/shm", OK, detail)


# ------------------------------------------------------------------------------------- network
def rendezvous_port(port: int, problem: str | None, nnodes: int, free_port: int) -> Check:
    """`problem`: why the port cannot be listened on (netcheck.port_in_use). On one node ddp-train runs
    torchrun --standalone, which picks its own port: only plain torchrun --master_port needs this one."""
    if problem is None:
        return Check("rendezvous port", OK, f"{port} is free")
    detail = f"cannot listen on {port} ({problem})"
    if nnodes == 1:
        return Check("rendezvous port", WARN, detail + "; ddp-train's --standalone picks a free one itself",
                     f"for plain torchrun use --master_port={free_port} (or MASTER_PORT={free_port})")
    return Check("rendezvous port", FAIL, detail,
                 f"use another port: --rdzv-endpoint HOST:{free_port} (or MASTER_PORT={free_port})")


def hostname(nnodes: int, gloo_ifname: str | None, host: str, host_ip: str | None, master: str | None,
             master_ip: str | None) -> Check:
    """Multi-node gloo listens on the address the hostname resolves to: loopback cannot be reached."""
    where = f"{host} -> {host_ip}"
    if host_ip is None:
        status = FAIL if nnodes > 1 else WARN
        return Check("hostname", status, f"{host} does not resolve", f"add '{host}' with its address to /etc/hosts")
    if nnodes == 1:
        note = " (loopback: fine on one node)" if host_ip.startswith("127.") else ""
        return Check("hostname", OK, where + note)
    if gloo_ifname:
        return Check("hostname", OK, f"{where}; GLOO_SOCKET_IFNAME={gloo_ifname} chooses the interface")
    problem = loopback_problem(host, host_ip, master or "the first node", master_ip)
    if problem:
        detail, _, fix = problem.partition(": set ")
        return Check("hostname", FAIL, detail, "set " + fix)
    return Check("hostname", OK, where)


# --------------------------------------------------------------------------------- signal delay
def last_save_seconds(root: Path, run_name: str | None) -> tuple[float, float, Path] | None:
    """(save seconds, step seconds, summary.json): the newest measured checkpoint save under run.root
    (the named run's own first); the longest save of that run when it recorded one."""
    candidates = [root / run_name / "summary.json"] if run_name else []
    candidates += sorted(root.glob("*/summary.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        seconds = summary.get("checkpoint_save_max_s") or summary.get("checkpoint_save_s")
        if isinstance(seconds, (int, float)):
            step = summary.get("step_time_s")
            return float(seconds), float(step) if isinstance(step, (int, float)) else 0.0, path
    return None


def signal_delay(delay_s: float, current: str, advise: Callable[[int], str],
                 known: tuple[float, float, Path] | None) -> Check:
    """A preemption save needs one step to reach the step boundary, then the save. Fails a delay that
    cannot cover that (the save would be killed); warns when the margin is under 2x (a loaded filesystem
    is slower than the measurement). `current` names the setting as it is, `advise(n)` as it should be."""
    if not known:
        return Check("signal delay", OK, f"{current}; no checkpoint save measured under run.root yet")
    save, step, where = known
    need = save + step
    fix = f"use {advise(int(SAVE_MARGIN * need) + 30)} or more"
    if delay_s <= need:
        return Check("signal delay", FAIL, f"{current} is too short: the last checkpoint save took {save:.0f} s "
                                           f"plus a step of {step:.1f} s ({where})", fix)
    if delay_s < SAVE_MARGIN * need:
        return Check("signal delay", WARN, f"{current} leaves little margin: the last save took {save:.0f} s plus "
                                           f"a step of {step:.1f} s ({where})", fix)
    return Check("signal delay", OK, f"{current} covers the last save ({save:.0f} s) plus a step ({step:.1f} s)")


# ---------------------------------------------------------------------------------------- data
def batches_per_rank(n_train: int, world: int, micro: int, accum: int, steps: list[int]) -> Check:
    """`steps`: each rank's optimizer steps per epoch under DistributedSampler(drop_last=True)."""
    global_batch = micro * accum * world
    if not steps or min(steps) == 0:
        return Check("batches per rank", FAIL, f"the global batch {global_batch} is larger than the training split "
                                               f"({n_train} samples)", "lower train.global_batch_size")
    if len(set(steps)) > 1:
        return Check("batches per rank", FAIL, f"ranks take {min(steps)}..{max(steps)} steps per epoch: the ranks "
                                               "would wait for each other", "report this: a bug of the sampler")
    dropped = n_train - steps[0] * global_batch
    detail = (f"{plural(world, 'rank')} x {steps[0]} steps per epoch of {micro} x {accum} micro-batches; {dropped} of "
              f"{n_train} samples left out per epoch")
    if dropped > DROPPED_WARN * n_train:
        return Check("batches per rank", WARN, detail, "a smaller train.global_batch_size uses more of the split")
    return Check("batches per rank", OK, detail)


def throughput(loader_sps: float, model_sps: float, what: str, fix: str) -> Check:
    """Per rank: samples/s the input pipeline delivers against samples/s the model trains on."""
    numbers = f"loader {loader_sps:.0f} samples/s vs model {model_sps:.0f} samples/s per rank ({what})"
    if loader_sps < model_sps:
        return Check("throughput", WARN, f"input-bound: {numbers}", fix)
    return Check("throughput", OK, f"compute-bound: {numbers}")
