"""The doctor's checks that need torch: versions and GPUs, the dataset as the engine opens it, the model's
checkpoint size, and a few seconds of loader-only against model-only throughput on this machine. Each
builds what it measures with the engine's own builders."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from .config import Config
from .doctor_checks import FAIL, OK, WARN, Check, plural
from .env import DistEnv, cpus_available
from .errors import UserError


# ------------------------------------------------------------------------------------ versions
def driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # no pynvml, no driver, no GPU: all mean "not known here"
        pass
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    words = text.split()
    return next((w for w in words if w[:1].isdigit() and "." in w), None)


def versions(nproc: int, backend: str) -> list[Check]:
    """torch, CUDA (+ driver), NCCL, and the GPUs this node shows against the processes it will run."""
    from .rundir.files import versions as installed

    known = installed()
    checks = [Check("torch", OK, f"{known['torch']} (torchvision {known['torchvision']}, CUDA build "
                                 f"{known['cuda'] or 'none'})")]
    driver = driver_version()
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        checks.append(Check("cuda", OK, f"CUDA {torch.version.cuda}, driver {driver or 'unknown'}, {n} GPU(s): "
                                        f"{torch.cuda.get_device_name(0)}"))
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
            checks.append(Check("nccl", OK, f"NCCL {nccl}"))
        except Exception as e:  # a torch built without NCCL
            checks.append(Check("nccl", FAIL if backend != "gloo" else WARN, f"NCCL unavailable ({e})",
                                "install a torch build with NCCL, or parallel.backend=gloo (slow on GPUs)"))
        if nproc > n:
            checks.append(Check("gpus", FAIL, f"{plural(nproc, 'process')} per node but {plural(n, 'GPU')} visible",
                                f"--nproc-per-node {n}, or make more GPUs visible (CUDA_VISIBLE_DEVICES)"))
        elif nproc < n:
            checks.append(Check("gpus", WARN, f"{plural(nproc, 'process')} per node leave {n - nproc} of {n} GPUs idle",
                                f"--nproc-per-node {n}"))
        else:
            checks.append(Check("gpus", OK, f"{plural(n, 'GPU')} for {plural(nproc, 'process')} per node"))
        return checks
    if driver:
        checks.append(Check("cuda", FAIL, f"NVIDIA driver {driver} is here but torch (CUDA build "
                                          f"{torch.version.cuda or 'none'}) sees no GPU",
                            "install a torch build for this driver (or update the driver); check CUDA_VISIBLE_DEVICES"))
    elif backend == "nccl":
        checks.append(Check("cuda", FAIL, "parallel.backend=nccl but no CUDA device",
                            "parallel.backend=auto (gloo on CPU), or run where GPUs are visible"))
    else:
        checks.append(Check("cuda", OK, "no GPU: CPU processes with gloo"))
    checks.append(Check("nccl", OK, "not used on CPU (gloo)"))
    cpus = cpus_available()
    detail = f"CPU: {plural(nproc, 'process')} per node on {plural(cpus, 'CPU')}"
    checks.append(Check("gpus", WARN, detail, f"--nproc-per-node {cpus}") if nproc > cpus else Check("gpus", OK, detail))
    return checks


# ----------------------------------------------------------------------------------------- data
def dataset(cfg: Config):
    """(Check, splits or None): the data opened as one process opens it, without downloading."""
    from .data import load
    from .data.sources import source

    src = source(cfg.data.name)
    try:
        splits = load(dataclasses.replace(cfg.data, download=False), src)
    except UserError as e:
        text = str(e).splitlines()[0]
        if src.downloads and cfg.data.download:
            return Check("dataset", WARN, f"not here yet: {text}", "rank 0 downloads it at the start "
                                                                 "(data.download=true); run the doctor after"), None
        problem, _, fix = text.rpartition("; ")
        return Check("dataset", FAIL, problem or text, fix), None
    info = splits.info
    counts = f"train {len(splits.train)} / test {len(splits.test)}"
    per_class = ""
    labels = _labels(splits.train)
    if labels is not None and len(labels):
        bins = torch.bincount(torch.as_tensor(labels), minlength=info.num_classes)
        per_class = f", {int(bins.min())}..{int(bins.max())} training samples per class"
    shape = f"{info.in_channels}x{info.image_size[0]}x{info.image_size[1]}"
    return Check("dataset", OK, f"{cfg.data.name}: {info.num_classes} classes, {counts}{per_class}, {shape}"), splits


def _labels(split):
    """The training labels where they can be read without opening a sample (in-memory splits, image folders,
    datasets with .targets), else None."""
    if hasattr(split, "labels"):
        return split.labels
    if hasattr(split, "targets"):
        return split.targets
    samples = getattr(split, "samples", None)
    return [label for _, label in samples] if samples else None


def steps_per_rank(n: int, world: int, micro: int, accum: int) -> list[int]:
    """Each rank's optimizer steps per epoch, from the sampler the engine uses."""
    from torch.utils.data.distributed import DistributedSampler

    return [len(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, drop_last=True))
            // (micro * accum) for r in range(world)]


# ---------------------------------------------------------------------------------------- model
def build(cfg: Config, info, device: torch.device) -> tuple[torch.nn.Module, int, int]:
    """(model on `device`, parameter bytes, buffer bytes), built and seeded as the engine builds it."""
    from .engine.memory_format import use_channels_last
    from .models import build_model

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, info)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # the engine's choice, so the probes time the run's memory format (one process: never sharded)
    cfg.train.channels_last = use_channels_last(cfg.train.channels_last, model, (info.in_channels, *info.image_size),
                                                device, sharded=False)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device), params, buffers


def _timed(step, seconds: float, max_iters: int) -> tuple[int, float]:
    """(iterations, seconds) of step() after one untimed warm-up; step() returns False when exhausted."""
    if step() is False:
        return 0, 0.0
    start, n = time.perf_counter(), 0
    while n < max_iters and time.perf_counter() - start < seconds:
        if step() is False:
            break
        n += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n, time.perf_counter() - start


def loader_rate(cfg: Config, splits, env: DistEnv, micro: int, device: torch.device, resident: bool,
                seconds: float) -> tuple[float, int]:
    """(samples/s, workers): rank 0's training batches, iterated with nothing else to do."""
    from .data import TrainBatches

    train = TrainBatches(splits.train, splits.info, env, cfg.data, micro, cfg.train.grad_accum_steps,
                         cfg.run.seed, device, resident, cfg.train.channels_last)
    try:
        batches = train.epoch(0)

        def step():
            return next(batches, None) is not None

        n, elapsed = _timed(step, seconds, max_iters=train.steps_per_epoch * cfg.train.grad_accum_steps - 1)
    finally:
        train.close()
    return (n * micro / elapsed if elapsed else float("inf")), train.workers


def model_rate(cfg: Config, model: torch.nn.Module, info, micro: int, device: torch.device, seconds: float) -> float:
    """Samples/s of forward + backward + optimizer step on synthetic batches of the training shape (one
    rank, no all-reduce, no torch.compile)."""
    from .engine.loss import build_loss
    from .engine.optim import build_optimizer
    from .engine.precision import Precision

    model.train()
    optimizer = build_optimizer(cfg.optim, model)
    loss_fn = build_loss(cfg.train, info.num_classes)
    precision = Precision(cfg.train.precision, device)
    x = torch.randn(micro, info.in_channels, *info.image_size, device=device)
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, info.num_classes, (micro,), device=device)

    def step():
        with precision.autocast():
            loss = loss_fn(model(x), y)
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
        optimizer.zero_grad(set_to_none=True)

    n, elapsed = _timed(step, seconds, max_iters=10_000)
    return n * micro / elapsed if elapsed else 0.0
