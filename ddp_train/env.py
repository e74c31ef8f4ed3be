"""Who am I in the job, read from the environment torchrun, SLURM or a hand-made launch sets: rank,
local rank, world, master address and port; restart counts, the launch id, torchrun's kill deadline.
The only module of ddp_train that reads os.environ (setenv is how others write it). Torch-free, except
DistEnv.device, which imports torch when asked."""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch


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
        import torch

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


# ------------------------------------------------------------------------- environment, read once
def getenv(key: str, default: str | None = None) -> str | None:
    return os.environ.get(key, default)


def setenv(key: str, value: str, overwrite: bool = True) -> None:
    """For the variables libraries read (WANDB_*, MASTER_ADDR, TORCH_ELASTIC_SHUTDOWN_TIMEOUT)."""
    if overwrite or key not in os.environ:
        os.environ[key] = value


def process_rank() -> int:
    """This process's global rank as its launcher set it (0 when unknown): for messages only."""
    try:
        return from_env().rank
    except UserError:
        return 0


def cpus_available() -> int:
    """CPUs this process may run on (its affinity mask: what SLURM or taskset gave it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def slurm_job_id() -> str:
    """<array job>_<task> inside an array, else the job id ('' outside SLURM): what scontrol takes."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID", "")


def slurm_cpus_per_task() -> int | None:
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(cpus) if cpus.isdigit() else None


def slurm_nodes() -> int | None:
    """Nodes of this SLURM job (SLURM_JOB_NUM_NODES), None outside SLURM."""
    nodes = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES", "")
    return int(nodes) if nodes.isdigit() else None


def slurm_restarts() -> int:
    """How many times SLURM requeued this job (SLURM_RESTART_COUNT)."""
    value = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0


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
        started = process_start_time(os.getppid())
        if started is not None:
            return time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    return None


def process_start_time(pid: int | str = "self") -> float | None:
    """A process's start as a wall-clock time (Linux: /proc/<pid>/stat field 22, clock ticks after boot)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None

