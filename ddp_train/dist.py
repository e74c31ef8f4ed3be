"""Process groups and the few collectives the engine needs: the main group (NCCL on GPUs, gloo on CPU),
a gloo control group for small CPU-side agreements, and a patient gloo group for the waits where one rank
works alone. Who this process is comes from env.py."""
from __future__ import annotations

import datetime
import socket
from typing import Any

import torch
import torch.distributed as dist

from .env import DistEnv, getenv, restart_count, setenv
from .errors import UserError
from .netcheck import loopback_problem, resolve

# ---------------------------------------------------------------------------------- process group
_CONTROL_GROUP = None  # gloo, parallel.timeout_s: small CPU-side agreements when the main backend is NCCL
_PATIENT_GROUP = None  # gloo, parallel.init_timeout_s: waits while one rank works alone (data, checkpoints)


def init(env: DistEnv, backend: str = "auto", timeout_s: int = 600, init_timeout_s: int | None = None) -> None:
    if not env.distributed or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise UserError("parallel.backend=nccl needs CUDA GPUs; use parallel.backend=gloo (or auto) on CPU")
    check_gloo_address(env)  # gloo carries the control group under NCCL too
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    setenv("MASTER_ADDR", env.master_addr, overwrite=False)
    setenv("MASTER_PORT", str(env.master_port), overwrite=False)
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = env.device  # eager NCCL init: a bad GPU fails here, not at the first step
        # NCCL's flight recorder: the last collectives of each rank, dumped by the hang sentinel
        setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000", overwrite=False)
    global _TRAINING_TIMEOUT
    _TRAINING_TIMEOUT = datetime.timedelta(seconds=timeout_s)
    # Until training is warm (start-up, resume, the first compiling steps) every group waits as long as
    # parallel.init_timeout_s: a rank slow to get there must not time the others out. warm() lowers it.
    patient = datetime.timedelta(seconds=max(timeout_s, init_timeout_s or timeout_s))
    timeout = patient if can_change_timeout() else _TRAINING_TIMEOUT
    if getenv("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent store outlives restarted workers; without a per-attempt prefix the new group
        # reads the dead workers' gloo addresses ("connectFullMesh ... Connection refused").
        base = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=patient)
        kwargs["store"] = dist.PrefixStore(f"ddp_train/attempt_{restart_count()}", base)
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
                            **kwargs)
    global _CONTROL_GROUP, _PATIENT_GROUP
    # Small CPU-side agreements (flags, RNG states, names) go over gloo, never through the GPU stream.
    _CONTROL_GROUP = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    _PATIENT_GROUP = dist.new_group(backend="gloo", timeout=patient)


_TRAINING_TIMEOUT: datetime.timedelta | None = None


def can_change_timeout() -> bool:
    return hasattr(dist, "set_timeout") or hasattr(dist.distributed_c10d, "_set_pg_timeout")


def warm() -> None:
    """Training is warm: from now on a collective that waits longer than parallel.timeout_s means a hung or
    dead rank (the patient group keeps the long timeout for checkpoint writes)."""
    if not dist.is_initialized() or _TRAINING_TIMEOUT is None:
        return
    setter = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
    setter(_TRAINING_TIMEOUT, None)  # the default group
    if _CONTROL_GROUP is not None:
        setter(_TRAINING_TIMEOUT, _CONTROL_GROUP)


def check_gloo_address(env: DistEnv) -> None:
    if env.world_size <= env.local_world_size or getenv("GLOO_SOCKET_IFNAME"):
        return  # one node, or the interface is chosen explicitly
    host = socket.gethostname()
    problem = loopback_problem(host, resolve(host), env.master_addr, resolve(env.master_addr))
    if problem:
        raise UserError(problem)


def side_store(env: DistEnv, timeout_s: float, name: str = "sentinel"):
    """A client of the job's TCPStore (torchrun's agent store, or rank 0's under plain env://) of its own,
    with a short timeout: for the hang sentinel's thread, which must neither share the main thread's
    client nor block for the collective timeout when the store's host is frozen (and for the console's
    warning relay, under its own `name`). None on one process."""
    if not env.distributed:
        return None
    try:
        base = dist.TCPStore(env.master_addr, env.master_port, is_master=False, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=timeout_s))
    except Exception:  # no store to reach (a custom init method): the sentinel watches this rank alone
        return None
    return dist.PrefixStore(f"ddp_train/{name}/attempt_{restart_count()}", base)


_BEFORE_TEARDOWN: list = []


def before_teardown(fn) -> None:
    """Run `fn` at the start of the next teardown(), while the job's store is still there (the console's
    warning relay reads the other ranks' last warnings through it; under env:// rank 0 hosts it)."""
    _BEFORE_TEARDOWN.append(fn)


def teardown() -> None:
    global _CONTROL_GROUP, _PATIENT_GROUP
    while _BEFORE_TEARDOWN:
        try:
            _BEFORE_TEARDOWN.pop()()
        except Exception:  # shutting down: one failing hook must not keep the process group up
            pass
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL_GROUP = _PATIENT_GROUP = None


def barrier(patient: bool = False) -> None:
    """patient: bounded by parallel.init_timeout_s (one rank may be busy alone, e.g. writing a checkpoint)."""
    if dist.is_initialized():
        dist.barrier(group=_PATIENT_GROUP if patient else _CONTROL_GROUP)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP only broadcasts them at the
    start of each training forward, and FSDP2 never does, so the ranks' running statistics drift apart
    within a step; evaluation must see the one model a checkpoint holds (rank 0's)."""
    if not dist.is_initialized():
        return
    for buf in model.buffers():
        if buf.is_floating_point() or buf.dtype in (torch.int64, torch.int32):
            dist.broadcast(buf.data, src=0)


def broadcast_module(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank: for a module each rank built itself (the Python
    API's model instances), before FSDP shards it or anything else reads it."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one: how ranks agree on stop/preempt. Runs on
    the CPU control group, so it never forces a host-device sync."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return bool(t.item())


class LaggedAnyRank:
    """any_rank, one call late: the all-reduce for call k starts at call k and is read at call k+1, so
    its network round trip hides behind a training step instead of stalling every step. Used for the
    per-step preemption flag, where one step of delay costs nothing."""

    def __init__(self):
        self._pending: tuple[Any, torch.Tensor] | None = None

    def poll(self, flag: bool) -> bool:
        if not dist.is_initialized():
            return flag
        agreed = self.drain()
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        self._pending = (dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP, async_op=True), t)
        return agreed

    def drain(self) -> bool:
        """Waits for the outstanding all-reduce (call before any other collective on the control group
        leaves the loop) and returns its result."""
        if self._pending is None:
            return False
        work, t = self._pending
        self._pending = None
        work.wait()
        return bool(t.item())


def broadcast_object(obj: Any, src: int = 0, patient: bool = False) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_PATIENT_GROUP if patient else _CONTROL_GROUP)
    return box[0]


def all_gather_object(obj: Any, patient: bool = False) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_PATIENT_GROUP if patient else _CONTROL_GROUP)
    return out


def hosts_per_rank() -> list[str]:
    """Every rank's host name in rank order (one all-gather at start-up): where each rank ran, for the log
    and summary.json. On several nodes it is the first thing to check when ranks disagree."""
    return all_gather_object(socket.gethostname(), patient=True)


def ranks_by_host(hosts: list[str]) -> str:
    """['n1', 'n1', 'n2'] -> 'n1: ranks 0-1 | n2: rank 2' (hosts in order of their first rank)."""
    groups: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        groups.setdefault(host, []).append(rank)
    parts = []
    for host, ranks in groups.items():
        contiguous = ranks == list(range(ranks[0], ranks[-1] + 1))
        if len(ranks) == 1:
            parts.append(f"{host}: rank {ranks[0]}")
        else:
            listed = f"{ranks[0]}-{ranks[-1]}" if contiguous else ",".join(map(str, ranks))
            parts.append(f"{host}: ranks {listed}")
    return " | ".join(parts)


def decide_on_main(env: DistEnv, fn, *args, **kwargs):
    """Rank 0 computes a (picklable) decision, every rank gets it; a UserError on rank 0 is raised on
    every rank, so no rank is left waiting at a collective. The others wait on the patient group: rank 0
    may take long (a download, a folder scan, hashing a large checkpoint)."""
    error, result = None, None
    if env.is_main:
        try:
            result = fn(*args, **kwargs)
        except UserError as e:
            error = (type(e), str(e))
    error, result = broadcast_object((error, result), patient=True)
    if error is not None:
        raise _shared(error[0](error[1]))
    return result


def everywhere_or_raise(env: DistEnv, fn, *args, **kwargs) -> None:
    """Runs fn on the ranks that call it with fn set (others pass fn=None), then agrees: the lowest rank's
    UserError is raised on every rank, so a failure on one node cannot leave the others waiting."""
    error = None
    if fn is not None:
        try:
            fn(*args, **kwargs)
        except UserError as e:
            error = (type(e), str(e))
    errors = [e for e in all_gather_object(error, patient=True) if e is not None]
    if errors:
        raise _shared(errors[0][0](errors[0][1]))


def _shared(e: UserError) -> UserError:
    e.shared = True  # every rank raises it: only rank 0 needs to print it
    return e
