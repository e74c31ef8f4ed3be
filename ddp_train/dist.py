"""Who am I in the job: rank/world from torchrun's or SLURM's environment, the device, process-group
setup/teardown and the few collectives the engine needs. The only module that reads os.environ."""
from __future__ import annotations

import datetime
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # torchrun | slurm | none

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", cuda_index(self.local_rank, torch.cuda.device_count()))
        return torch.device("cpu")


def cuda_index(local_rank: int, visible: int) -> int:
    """The LOCAL rank picks the GPU (the global rank breaks on 2+ nodes). When SLURM/submitit restricts
    CUDA_VISIBLE_DEVICES to this task's own GPU, `visible` is 1 and every task uses its index 0."""
    return local_rank % visible


def _int(env: dict[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise UserError(f"environment variable {key}={env[key]!r} is not an integer") from None


def from_env(env: dict[str, str] | None = None) -> DistEnv:
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; srun without torchrun sets SLURM_PROCID/LOCALID/NTASKS."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(rank=_int(env, "RANK"), local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                       world_size=_int(env, "WORLD_SIZE"),
                       local_world_size=_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 1,
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
                       launcher="torchrun" if "TORCHELASTIC_RUN_ID" in env else "env")
    # Only inside an srun step (SLURM_STEP_ID): a batch script also carries SLURM_PROCID=0 and the
    # allocation's SLURM_NTASKS, and a lone `python -m ddp_train` there must not wait for absent ranks.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        ntasks = _int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
        if ntasks > 1:
            per_node = env.get("SLURM_STEP_TASKS_PER_NODE", "").split("(")[0].split(",")[0]
            nnodes = _int(env, "SLURM_STEP_NUM_NODES") if "SLURM_STEP_NUM_NODES" in env else 1
            addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_STEP_NODELIST")
                                                               or env.get("SLURM_JOB_NODELIST", ""))
            port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else _port_from_job(env.get("SLURM_JOB_ID", "0"))
            return DistEnv(rank=_int(env, "SLURM_PROCID"), local_rank=_int(env, "SLURM_LOCALID"),
                           world_size=ntasks,
                           local_world_size=int(per_node) if per_node.isdigit() else max(1, ntasks // nnodes),
                           master_addr=addr, master_port=port, launcher="slurm")
    return DistEnv()


def _first_slurm_host(nodelist: str) -> str:
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    # Fallback for simple lists: "node[01-04],gpu7" -> "node01"
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def _port_from_job(job_id: str) -> int:
    """A port every task of one job derives alike, so concurrent jobs on a node rarely collide."""
    digits = "".join(ch for ch in job_id if ch.isdigit()) or "0"
    return 20000 + int(digits[-4:]) % 20000


# ---------------------------------------------------------------------------------- process group
_CONTROL_GROUP = None  # gloo group for CPU-side agreement when the main backend is NCCL


def init(env: DistEnv, backend: str = "auto", timeout_s: int = 600) -> None:
    if not env.distributed or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise UserError("parallel.backend=nccl needs CUDA GPUs; use parallel.backend=gloo (or auto) on CPU")
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = env.device  # eager NCCL init: a bad GPU fails here, not at the first step
    timeout = datetime.timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent store outlives restarted workers; without a per-attempt prefix the new group
        # reads the dead workers' gloo addresses ("connectFullMesh ... Connection refused").
        base = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
        kwargs["store"] = dist.PrefixStore(f"ddp_train/attempt_{restart_count()}", base)
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
                            **kwargs)
    global _CONTROL_GROUP
    # Small CPU-side agreements (flags, RNG states, names) go over gloo, never through the GPU stream.
    _CONTROL_GROUP = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None


def teardown() -> None:
    global _CONTROL_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL_GROUP = None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_CONTROL_GROUP)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_CONTROL_GROUP)
    return out


def decide_on_main(env: DistEnv, fn, *args, **kwargs):
    """Rank 0 computes a (picklable) decision, every rank gets it; a UserError on rank 0 is raised on
    every rank, so no rank is left waiting at a collective."""
    error, result = None, None
    if env.is_main:
        try:
            result = fn(*args, **kwargs)
        except UserError as e:
            error = (type(e), str(e))
    error, result = broadcast_object((error, result))
    if error is not None:
        raise _shared(error[0](error[1]))
    return result


def _shared(e: UserError) -> UserError:
    e.shared = True  # every rank raises it: only rank 0 needs to print it
    return e


def run_on_main_first(env: DistEnv, fn, *args, **kwargs):
    """Rank 0 runs fn first (e.g. a download), the others wait, then run it themselves (reading the
    files). A UserError on rank 0 is raised on every rank instead of leaving the others hanging."""
    error = None
    result = None
    if env.is_main:
        try:
            result = fn(*args, **kwargs)
        except UserError as e:
            error = (type(e), str(e))
    error = broadcast_object(error)
    if error is not None:
        raise _shared(error[0](error[1]))
    if not env.is_main:
        result = fn(*args, **kwargs)
    return result


# ------------------------------------------------------------------------- environment, read once
def getenv(key: str, default: str | None = None) -> str | None:
    return os.environ.get(key, default)


def restart_count() -> int:
    """How many times torchrun restarted this worker group, or SLURM requeued this job."""
    for key in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        if os.environ.get(key, "").isdigit():
            n = int(os.environ[key])
            if n:
                return n
    return 0


def launch_id() -> str | None:
    """A name part shared by every process of this launch and kept by its restarts and requeues: SLURM's
    job id (array-aware), or the start time of the torchrun agent (it outlives restarted workers)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"job{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"job{os.environ['SLURM_JOB_ID']}"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        started = _process_start_time(os.getppid())
        if started is not None:
            return time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    return None


def _process_start_time(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None

