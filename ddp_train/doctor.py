"""`python -m ddp_train.doctor [CONFIG] [key=value ...] [--nproc-per-node N]`: will this job work here, and
what will limit it? A table of checks, each ok / warn / fail with the fix in one line: Python (a fork
deadlock), versions and GPUs, /dev/shm, the rendezvous port, the hostname for multi-node gloo, run root and
disk, the dataset and the batches per rank, the signal delay against the last measured save, and loader-only against model-only
throughput (input-bound or compute-bound). Exit 0 without a fail, 2 with one (and for a config mistake,
reported in one line as the engine reports it)."""
from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from . import doctor_checks as checks
from . import env as envvars
from . import netcheck
from .config import Config
from .doctor_checks import FAIL, WARN, Check
from .errors import USER_ERROR_EXIT, UserError, report

TORCHRUN_PORT = 29500  # torchrun's --master_port default


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddp_train.doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value", help="config file, then engine overrides")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes per node the job will run")
    p.add_argument("--nnodes", type=int, default=None, help="nodes (default: the SLURM job's, else 1)")
    p.add_argument("--signal-delay", type=int, default=None,
                   help="seconds a preemption save gets (SLURM --signal-delay; default parallel.shutdown_timeout_s)")
    p.add_argument("--seconds", type=float, default=2.0, help="each throughput measurement's length (default 2)")
    return p


def environment_checks(nnodes: int) -> list[Check]:
    """Port, hostname: torch-free, about this machine."""
    port_text = envvars.getenv("MASTER_PORT", "")
    port = int(port_text) if port_text.isdigit() else TORCHRUN_PORT
    host, master = socket.gethostname(), envvars.getenv("MASTER_ADDR")
    return [checks.python_fork(tuple(sys.version_info[:3])),
            checks.rendezvous_port(port, netcheck.port_in_use(port), nnodes, netcheck.free_port()),
            checks.hostname(nnodes, envvars.getenv("GLOO_SOCKET_IFNAME"), host, netcheck.resolve(host), master,
                            netcheck.resolve(master) if master else None)]


def signal_check(cfg: Config, delay: int | None) -> Check:
    root = Path(cfg.run.root)
    known = checks.last_save_seconds(root, cfg.run.name) if root.is_dir() else None
    if delay is not None:
        return checks.signal_delay(delay, f"--signal-delay {delay}s", lambda n: f"--signal-delay {n}", known)
    delay = cfg.parallel.shutdown_timeout_s
    return checks.signal_delay(delay, f"parallel.shutdown_timeout_s={delay} (torchrun's SIGTERM to SIGKILL)",
                               lambda n: f"parallel.shutdown_timeout_s={n}", known)


ORDER = ["python", "torch", "cuda", "nccl", "gpus", "/dev/shm", "rendezvous port", "hostname", "run root", "disk", "dataset",
         "batches per rank", "signal delay", "throughput"]


def diagnose(cfg: Config, nproc: int, nnodes: int, signal_delay: int | None, seconds: float) -> list[Check]:
    from . import doctor_probe as probe
    from .config import micro_batch_size

    world = nproc * nnodes
    rank0 = envvars.DistEnv(world_size=world, local_world_size=nproc)
    device = rank0.device
    root = Path(cfg.run.root)
    copies = cfg.checkpoint.keep_last + cfg.checkpoint.keep_best + 1
    found = [*probe.versions(nproc, cfg.parallel.backend), *environment_checks(nnodes),
             checks.run_root(root), signal_check(cfg, signal_delay)]
    data_check, splits = probe.dataset(cfg)
    found.append(data_check)
    micro = None
    try:
        micro = micro_batch_size(cfg, world)
    except UserError as e:
        problem, _, fix = str(e).partition(": use ")
        found.append(Check("batches per rank", FAIL, problem, f"use {fix}"))
    if splits is None:
        skipped = "not measured: the dataset did not open"
        found += [checks.disk_space(root, copies, None), Check("/dev/shm", WARN, skipped),
                  Check("throughput", WARN, skipped)]
        return sorted(found, key=lambda c: ORDER.index(c.name))
    model, params, buffers = probe.build(cfg, splits.info, device)
    ckpt = checks.checkpoint_bytes(params, buffers, cfg.optim.name, cfg.optim.momentum, bool(cfg.train.ema_decay))
    found.append(checks.disk_space(root, copies, ckpt, source=f"{params // 4:,} fp32 parameters + {cfg.optim.name} state"))
    if micro is not None:
        found += measure(cfg, splits, model, rank0, micro, seconds)
    return sorted(found, key=lambda c: ORDER.index(c.name))


def measure(cfg: Config, splits, model, rank0: envvars.DistEnv, micro: int, seconds: float) -> list[Check]:
    """/dev/shm for the workers, the batches per rank, and loader-only vs model-only samples/s of rank 0."""
    from . import doctor_probe as probe
    from .data import use_device_resident, worker_count
    from .data.batches import PREFETCH_FACTOR
    from .engine.run import intra_op_threads

    device, nproc, accum = rank0.device, rank0.local_world_size, cfg.train.grad_accum_steps
    resident = use_device_resident(cfg.data, splits, device)
    workers = 0 if resident else worker_count(cfg.data.num_workers, nproc)
    info = splits.info
    batch_bytes = micro * (4 * info.in_channels * info.image_size[0] * info.image_size[1] + 8)  # fp32 + int64
    n = len(splits.train)
    steps = probe.steps_per_rank(n, rank0.world_size, micro, accum)
    found = [checks.shm(checks.shm_free(), nproc, workers, PREFETCH_FACTOR, batch_bytes),
             checks.batches_per_rank(n, rank0.world_size, micro, accum, steps)]
    if min(steps) == 0:
        return found + [Check("throughput", WARN, "not measured: no full global batch in the split")]
    intra_op_threads(rank0, workers)  # this rank's share of the CPUs, as the engine sets it
    loader, workers = probe.loader_rate(cfg, splits, rank0, micro, device, resident, seconds)
    compute = probe.model_rate(cfg, model, info, micro, device, seconds)
    path = "device-resident" if resident else f"DataLoader, {checks.plural(workers, 'worker')}"
    fix = (f"more data.num_workers (now {workers}), data.device_resident when the split fits, faster storage or "
           "lighter per-sample transforms")
    return found + [checks.throughput(loader, compute, f"micro-batch {micro}, {path}, {device.type}", fix)]


def table(found: list[Check]) -> str:
    width = max(len(c.name) for c in found)
    lines = [f"{'status':<6}  {'check':<{width}}  detail"]
    for c in found:
        lines.append(f"{c.status:<6}  {c.name:<{width}}  {c.detail}")
        if c.fix and c.status != checks.OK:
            lines.append(f"{'':<6}  {'':<{width}}  fix: {c.fix}")
    fails, warns = sum(c.status == FAIL for c in found), sum(c.status == WARN for c in found)
    lines.append(f"doctor: {len(found)} checks, {fails} fail, {warns} warn")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    try:
        from .config import load_config
        from .config.argv import split_argv

        config_path, overrides, flags = split_argv(args.args)
        if flags:
            raise UserError(f"--{sorted(flags)[0]} is an engine flag: run python -m ddp_train for it")
        if args.nproc_per_node < 1 or (args.nnodes is not None and args.nnodes < 1):
            raise UserError("--nproc-per-node and --nnodes must be >= 1")
        cfg = load_config(config_path, overrides)
        nnodes = args.nnodes or envvars.slurm_nodes() or 1
        found = diagnose(cfg, args.nproc_per_node, nnodes, args.signal_delay, args.seconds)
    except UserError as e:
        return report("ddp_train.doctor", e)
    print(table(found), flush=True)
    return USER_ERROR_EXIT if any(c.status == FAIL for c in found) else 0


if __name__ == "__main__":
    sys.exit(main())
