"""Checks that run on the login node before anything is submitted. Each failure is a UserError: one line,
exit 2, no job. A bad request found here costs seconds; found by SLURM it costs a queue wait."""
from __future__ import annotations

import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ddp_train import doctor_checks
from ddp_train.config import Config, micro_batch_size
from ddp_train.doctor_checks import last_save_seconds
from ddp_train.errors import UserError
from ddp_train.rundir.naming import ensure_writable
from ddp_train.usercode import check_paths

NODE_LOCAL = ("/tmp", "/dev/shm", "/var/tmp", "/run")


@dataclass
class Request:
    nodes: int
    gpus_per_node: int
    tasks_per_node: int | None  # None: one per GPU, or 1 on CPU
    time_min: int
    signal_delay_s: int
    max_requeues: int
    partition: str | None
    dry_run: bool
    max_nodes: int | None = None  # --nodes A-B: SLURM starts the job on any count from A to B

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def node_counts(self) -> list[int]:
        return list(range(self.nodes, (self.max_nodes or self.nodes) + 1))

    @property
    def nodes_spec(self) -> int | str:
        """What sbatch --nodes gets: N, or the range "A-B"."""
        return f"{self.nodes}-{self.max_nodes}" if self.max_nodes and self.max_nodes != self.nodes else self.nodes

    @property
    def world_size(self) -> int:
        """The largest world size the job can get (every count of a node range is checked)."""
        return self.node_counts[-1] * self.ntasks_per_node


def node_range(text: str) -> tuple[int, int | None]:
    """--nodes N or --nodes A-B (SLURM's syntax) -> (A, B or None)."""
    lo, dash, hi = text.partition("-")
    if not lo.strip().isdigit() or (dash and not hi.strip().isdigit()):
        raise UserError(f"--nodes {text}: write a node count (--nodes 2) or a range (--nodes 2-4)")
    return int(lo), int(hi) if dash else None


def check_request(req: Request) -> None:
    if req.nodes < 1:
        raise UserError(f"--nodes {req.nodes_spec}: must be >= 1")
    if req.max_nodes is not None and req.max_nodes < req.nodes:
        raise UserError(f"--nodes {req.nodes}-{req.max_nodes}: the range must not shrink (write --nodes "
                        f"{req.max_nodes}-{req.nodes})")
    if req.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node {req.gpus_per_node}: must be >= 0 (0 = CPU processes with gloo)")
    if req.tasks_per_node is not None and req.tasks_per_node < 1:
        raise UserError(f"--tasks-per-node {req.tasks_per_node}: must be >= 1")
    if req.gpus_per_node and req.tasks_per_node and req.tasks_per_node != req.gpus_per_node:
        raise UserError(f"--tasks-per-node {req.tasks_per_node} != --gpus-per-node {req.gpus_per_node}: the "
                        "launcher runs one task per GPU; drop --tasks-per-node or make them equal")
    if req.time_min < 1:
        raise UserError(f"--time {req.time_min}: the time limit is in minutes and must be >= 1")
    if req.max_requeues < 0:
        raise UserError(f"--max-requeues {req.max_requeues}: must be >= 0")
    if req.signal_delay_s < 1 or req.signal_delay_s >= req.time_min * 60:
        raise UserError(f"--signal-delay {req.signal_delay_s}s must be between 1 s and the time limit "
                        f"({req.time_min * 60} s): it is how long before the limit the job is told to save")


def check_config(cfg: Config, req: Request, label: str = "") -> None:
    """The engine's own checks, for every world size this request can give (each count of a node range),
    and the user's modules import."""
    check_paths(cfg)
    where = f" (sweep element {label})" if label else ""
    for nodes in req.node_counts:
        try:
            micro_batch_size(cfg, nodes * req.ntasks_per_node)
        except UserError as e:
            fits = ""
            if len(req.node_counts) > 1:
                parts = [n * req.ntasks_per_node * cfg.train.grad_accum_steps for n in req.node_counts]
                fits = (f"; --nodes {req.nodes_spec} may start on any of {req.node_counts[0]}-{req.node_counts[-1]} "
                        f"nodes: a global batch of a multiple of {math.lcm(*parts)} fits them all")
            raise UserError(f"{e} -- with --nodes {nodes} x {req.ntasks_per_node} tasks per node{fits}{where}") from None


def check_run_root(root: Path, req: Request) -> None:
    if req.node_counts[-1] > 1 and str(root.resolve()).startswith(NODE_LOCAL):
        raise UserError(f"run.root={root} is node-local; with --nodes {req.nodes_spec} every node must see the same "
                        "run directory: put run.root on a shared filesystem")
    ensure_writable(root, f"run.root={root}", "the run root")


def check_signal_delay(req: Request, root: Path, run_name: str | None) -> str | None:
    """The doctor's check of the signal delay against the last measured save: a fail is refused (the save
    would be killed), a warning is returned."""
    check = doctor_checks.signal_delay(req.signal_delay_s, f"--signal-delay {req.signal_delay_s}s",
                                       lambda n: f"--signal-delay {n}", last_save_seconds(root, run_name))
    return _raise_or_warn(check)


def check_disk(cfg: Config, root: Path) -> str | None:
    """Free disk under run.root against the checkpoints the run keeps, sized by the newest checkpoint a
    previous run left there (the login node builds no model)."""
    measured = doctor_checks.measured_checkpoint_bytes(root)
    copies = cfg.checkpoint.keep_last + cfg.checkpoint.keep_best + 1
    check = doctor_checks.disk_space(root, copies, measured[0] if measured else None,
                                     source=f"as {measured[1]}" if measured else "")
    return _raise_or_warn(check)


def _raise_or_warn(check: doctor_checks.Check) -> str | None:
    message = f"{check.detail}; {check.fix}" if check.fix else check.detail
    if check.status == doctor_checks.FAIL:
        raise UserError(message)
    return message if check.status == doctor_checks.WARN else None


def default_cpus_per_task(req: Request) -> int | None:
    """Without --cpus-per-task: the partition's CPUs per node shared among the tasks on a node (what
    torchrun users get by default), from sinfo; None when SLURM cannot be asked (then SLURM's default)."""
    if shutil.which("sinfo") is None:
        return None
    cmd = ["sinfo", "-h", "-o", "%c"] + (["-p", req.partition] if req.partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    counts = [int(c.rstrip("+")) for c in out if c.rstrip("+").isdigit()]
    return max(1, min(counts) // req.ntasks_per_node) if counts else None


def check_slurm(req: Request) -> None:
    if req.dry_run:
        return
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise UserError("sbatch/srun not found: run this on a SLURM login node, or add --dry-run to only print "
                        "the job script")
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise UserError("sinfo did not answer in 60 s: is slurmctld up?") from None
    if proc.returncode != 0:
        said = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"SLURM is not reachable from here ({said}); check SLURM_CONF and slurmctld")
    known = [p.rstrip("*") for p in proc.stdout.split()]
    if req.partition:
        if known and req.partition not in known:
            raise UserError(f"--partition {req.partition}: no such partition; this cluster has "
                            f"{', '.join(known)}")
