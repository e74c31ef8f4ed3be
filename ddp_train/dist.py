"""Who am I in the job: rank/world from torchrun's or SLURM's environment, the device, process-group
setup/teardown and the few collectives the engine needs. The only module that reads os.environ."""
from __future__ import annotations

import datetime
import os
import socket
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
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else None
        return DistEnv(rank=rank, local_rank=_local_rank(env, rank, world, local_world), world_size=world,
                       local_world_size=local_world or 1,
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
            addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST")
                                                        or env.get("SLURM_JOB_NODELIST", ""))
            port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else _port_from_job(env.get("SLURM_JOB_ID", "0"))
            return DistEnv(rank=_int(env, "SLURM_PROCID"), local_rank=_int(env, "SLURM_LOCALID"),
                           world_size=ntasks,
                           local_world_size=int(per_node) if per_node.isdigit() else max(1, ntasks // nnodes),
                           master_addr=addr, master_port=port, launcher="slurm")
    return DistEnv()


def _local_rank(env: dict[str, str], rank: int, world: int, local_world: int | None) -> int:
    """LOCAL_RANK picks the GPU. A hand-made launch that sets only RANK/WORLD_SIZE gets it derived from
    LOCAL_WORLD_SIZE (ranks fill nodes in order, as torchrun and srun place them) or SLURM_LOCALID; with
    neither, several ranks would all land on GPU 0, so that is refused."""
    if "LOCAL_RANK" in env:
        return _int(env, "LOCAL_RANK")
    if local_world:
        return rank % local_world
    if "SLURM_LOCALID" in env:
        return _int(env, "SLURM_LOCALID")
    if world == 1:
        return 0
    raise UserError(f"RANK={rank} and WORLD_SIZE={world} are set but LOCAL_RANK is not: set LOCAL_RANK (or "
                    "LOCAL_WORLD_SIZE, the processes per node), or launch with torchrun, which sets them")


def expand_hostlist(nodelist: str) -> list[str]:
    """SLURM's compressed host lists, as `scontrol show hostnames` expands them: 'gpu[07-08],cpu1' and
    several bracket groups such as 'rack[1-2]-n[01-04]' (zero padding kept). Raises UserError otherwise."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        expansions = [""]
        rest = part
        while rest:
            if "[" not in rest:
                expansions = [e + rest for e in expansions]
                break
            prefix, _, after = rest.partition("[")
            inside, closed, rest = after.partition("]")
            if not closed or not inside:
                raise UserError(f"cannot read the SLURM node list {nodelist!r}: unbalanced brackets; set "
                                "MASTER_ADDR to the first node's address")
            expansions = [e + prefix + n for e in expansions for n in _range_items(inside, nodelist)]
        hosts += expansions
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p for p in parts + [current] if p]


def _range_items(inside: str, nodelist: str) -> list[str]:
    out = []
    for item in inside.split(","):
        lo, dash, hi = item.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise UserError(f"cannot read the SLURM node list {nodelist!r} (range {item!r}); set MASTER_ADDR to "
                            "the first node's address")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi or lo) + 1)]
    return out


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: scontrol's expansion, else our own parser."""
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return expand_hostlist(nodelist)[0]


def _port_from_job(job_id: str) -> int:
    """A port every task of one job derives alike, so concurrent jobs on a node rarely collide."""
    digits = "".join(ch for ch in job_id if ch.isdigit()) or "0"
    return 20000 + int(digits[-4:]) % 20000


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
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = env.device  # eager NCCL init: a bad GPU fails here, not at the first step
    global _TRAINING_TIMEOUT
    _TRAINING_TIMEOUT = datetime.timedelta(seconds=timeout_s)
    # Until training is warm (start-up, resume, the first compiling steps) every group waits as long as
    # parallel.init_timeout_s: a rank slow to get there must not time the others out. warm() lowers it.
    patient = datetime.timedelta(seconds=max(timeout_s, init_timeout_s or timeout_s))
    timeout = patient if can_change_timeout() else _TRAINING_TIMEOUT
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
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


def loopback_problem(host: str, host_ip: str | None, master: str, master_ip: str | None) -> str | None:
    """Why gloo cannot work across nodes here, or None. Gloo listens on the address this host's name
    resolves to; a name mapped to 127.0.1.1 (Debian and most container images) makes it listen on
    loopback, where other machines cannot connect. Everything on loopback (the master too) is one machine."""
    if host_ip is None or not host_ip.startswith("127."):
        return None
    if master_ip is not None and master_ip.startswith("127."):
        return None
    return (f"this host's name {host!r} resolves to {host_ip} (loopback), so gloo would listen where the other "
            f"nodes cannot reach it (MASTER_ADDR={master}): set GLOO_SOCKET_IFNAME to the network interface "
            "they reach (e.g. GLOO_SOCKET_IFNAME=eth0), or map the hostname to its real address in /etc/hosts")


def check_gloo_address(env: DistEnv) -> None:
    if env.world_size <= env.local_world_size or os.environ.get("GLOO_SOCKET_IFNAME"):
        return  # one node, or the interface is chosen explicitly
    host = socket.gethostname()
    problem = loopback_problem(host, _resolve(host), env.master_addr, _resolve(env.master_addr))
    if problem:
        raise UserError(problem)


def _resolve(name: str) -> str | None:
    try:
        return socket.gethostbyname(name)
    except OSError:
        return None


def teardown() -> None:
    global _CONTROL_GROUP, _PATIENT_GROUP
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


def agent_shutdown_timeout() -> float | None:
    """Seconds torchrun's agent waits between forwarding SIGTERM to its workers and SIGKILL, or None when
    no torchrun agent is the parent. Read from the agent's command line (--shutdown-timeout), then the
    environment torchrun reads (PET_SHUTDOWN_TIMEOUT, TORCH_ELASTIC_SHUTDOWN_TIMEOUT); 30 s otherwise, and
    always on a torch whose torchrun has no such setting."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        from torch.distributed.launcher.api import LaunchConfig

        if "shutdown_timeout" not in getattr(LaunchConfig, "__dataclass_fields__", {}):
            return 30.0
    except ImportError:
        return 30.0
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0")]
    except OSError:
        args = []
    for i, arg in enumerate(args):
        for flag in ("--shutdown-timeout", "--shutdown_timeout"):
            if arg == flag and i + 1 < len(args):
                return _float_or(args[i + 1], 30.0)
            if arg.startswith(flag + "="):
                return _float_or(arg.split("=", 1)[1], 30.0)
    for key in ("PET_SHUTDOWN_TIMEOUT", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        if os.environ.get(key):
            return _float_or(os.environ[key], 30.0)
    return 30.0


def _float_or(text: str, default: float) -> float:
    try:
        return float(text)
    except ValueError:
        return default


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

