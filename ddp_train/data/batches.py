"""Per-rank batches for training and evaluation.

Training order is DistributedSampler(seed, shuffle, drop_last=True) with set_epoch every epoch, on both
paths: the device-resident path (the whole split as uint8 on the device, batches by index, normalised
per batch) and the DataLoader path (workers, pinned memory, per-sample transforms seeded by (seed,
epoch, sample index), workers deaf to the preemption signals so the ranks can save). Each optimizer step consumes exactly global_batch_size
samples; the incomplete last global batch of an epoch is dropped, which is what makes 1 process and N
processes take the same optimizer steps. Evaluation shards the test split as rank::world with no padding,
so every sample is counted exactly once."""
from __future__ import annotations

import faulthandler
import math
import signal
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torch.utils.data.distributed import DistributedSampler

from ..config import DataConfig
from ..env import DistEnv, cpus_available
from ..errors import ConfigError, DataError
from .augment import BatchAugment, keyed_rng
from .mixing import PAIR, BatchMixer
from .types import DataInfo, ImageTensors, Splits

RESIDENT_CPU_BYTES = 4 << 30  # uint8 copy of the splits kept in RAM when training on CPU
RESIDENT_GPU_FRACTION = 0.25  # of the GPU's memory
# A DataLoader worker prints its Python stacks to stderr on this signal: the hang sentinel sends it, so a
# worker that never delivers a batch is seen where it stands (its rank only shows the wait for it).
WORKER_STACKS_SIGNAL = getattr(signal, "SIGRTMIN", None)
PREFETCH_FACTOR = 4  # batches each DataLoader worker keeps ready (in shared memory: the doctor sizes /dev/shm by it)


def use_device_resident(cfg: DataConfig, splits: Splits, device: torch.device) -> bool:
    if cfg.device_resident is False:
        return False
    if not splits.in_memory:
        if cfg.device_resident is True:
            raise ConfigError(f"data.device_resident=true needs an in-memory dataset; '{cfg.name}' is read "
                              "from files: use data.device_resident=auto")
        return False
    if cfg.device_resident is True:
        return True
    need = splits.train.images.numel() + splits.test.images.numel()  # uint8: one byte per value
    if device.type == "cuda":
        return need < RESIDENT_GPU_FRACTION * torch.cuda.get_device_properties(device).total_memory
    return need < RESIDENT_CPU_BYTES


def worker_count(setting: int | str, local_world_size: int) -> int:
    """data.num_workers=auto: the CPUs this rank may use (its share of the node's), minus one for the
    training process itself, between 1 and 8."""
    if setting != "auto":
        return int(setting)
    return max(1, min(8, cpus_available() // max(1, local_world_size) - 1))


class Normaliser:
    """uint8 [N,C,H,W] -> normalised float32, on whatever device the batch is. The device-resident splits
    stay uint8 (4x less memory than float32) and are normalised a batch at a time: the same elementwise
    operations, so the same values as normalising the whole split once."""

    def __init__(self, info: DataInfo, device: torch.device, channels_last: bool):
        self.mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255).sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class ResidentSplit:
    """A whole split on the device as uint8, handed out a batch of indices at a time, normalised."""

    def __init__(self, split: ImageTensors, info: DataInfo, device: torch.device, channels_last: bool):
        self.x = split.images.to(device)
        self.y = split.labels.to(device)
        self.normalise = Normaliser(info, device, channels_last)

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.normalise(self.x[idx]), self.y[idx]


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    """A DataLoader batch onto the device (asynchronously from pinned memory)."""
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


class NormalisedTensors(Dataset):
    """Per-sample normalisation of an in-memory split, for the DataLoader path."""

    def __init__(self, split: ImageTensors, info: DataInfo):
        self.split = split
        self.mean = torch.tensor(info.mean).view(-1, 1, 1)
        self.std = torch.tensor(info.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return (self.split.images[i].float().div(255) - self.mean) / self.std, self.split.labels[i]


class SampleKeyed(Dataset):
    """Indexed by (epoch, index): every random draw of a sample's transforms (RandomResizedCrop, flips, a
    user dataset's own) comes from generators seeded by (run seed, epoch, sample index). So the draws do
    not depend on the rank, the worker or what ran before: ranks draw independently, a resumed run draws
    what the uninterrupted one drew, and any world size sees the same sample the same way."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        # our own normalised tensors draw nothing: seeding three generators per sample would only cost time
        self.draws = not isinstance(dataset, NormalisedTensors)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        if not self.draws:
            return self.dataset[index]
        # In a worker nothing else uses the global generators; in the training process they are dropout's.
        with keyed_rng(self.seed, epoch, index, restore=get_worker_info() is None):
            return self.dataset[index]


class _ListSampler(Sampler):
    """Iterates whatever keys the epoch set; lets persistent workers survive across epochs."""

    def __init__(self):
        self.indices: list = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _IgnoreSignals:
    """worker_init_fn: preemption signals are for the training processes, which save and then shut the
    workers down. A worker that died of SIGTERM (sent to the whole process group by scancel, docker stop,
    kill -- -PGID) would crash its rank before the save."""

    def __init__(self, names: list[str]):
        self.names = list(names)

    def __call__(self, worker_id: int) -> None:
        for name in self.names:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        if WORKER_STACKS_SIGNAL is not None:
            faulthandler.register(WORKER_STACKS_SIGNAL, all_threads=True)


def _loader(ds: Dataset, batch: int, sampler, cfg: DataConfig, device: torch.device, workers: int,
            seed: int, ignore_signals: list[str]) -> DataLoader:
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                      pin_memory=cfg.pin_memory and device.type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
                      worker_init_fn=_IgnoreSignals(ignore_signals) if workers > 0 else None,
                      # its own generator: iterating must not draw from the global RNG (dropout's stream)
                      generator=torch.Generator().manual_seed(seed))


def shutdown(loader: DataLoader | None) -> None:
    """Stops a loader's workers now: the poison pill and a join (what torch does at exit), then SIGKILL for
    a worker still busy, since the workers ignore SIGTERM. Without it the interpreter's exit can wait on
    them."""
    it = getattr(loader, "_iterator", None)
    if it is None or not hasattr(it, "_shutdown_workers"):
        return
    it._shutdown_workers()
    for w in getattr(it, "_workers", []):
        if w.is_alive():
            w.kill()
            w.join(timeout=5)
    loader._iterator = None


def _batches(loader: DataLoader):
    """The loader's batches; a DataError raised in a worker (an unreadable file) comes back from
    DataLoader wrapped in a worker traceback: re-raise it as its own one line."""
    try:
        yield from loader
    except DataError as e:
        text = str(e).strip().splitlines()
        last = next((ln for ln in reversed(text) if "DataError: " in ln), text[-1] if text else "")
        raise DataError(last.split("DataError: ", 1)[-1]) from None


def _as_dataset(split, info: DataInfo) -> Dataset:
    return NormalisedTensors(split, info) if isinstance(split, ImageTensors) else split


class TrainBatches:
    """Micro-batches for one epoch, from any optimizer step inside it (exact mid-epoch resume)."""

    def __init__(self, split, info: DataInfo, env: DistEnv, cfg: DataConfig, micro_batch: int, accum: int,
                 seed: int, device: torch.device, resident: bool, channels_last: bool = False,
                 ignore_signals: list[str] = ()):
        self.micro, self.accum, self.device = micro_batch, accum, device
        # Device augmentation for in-memory splits; file datasets (imagefolder) augment in their transforms.
        in_memory = isinstance(split, ImageTensors)
        self.augment = BatchAugment(seed, info.flips) if cfg.augment and in_memory else None
        mixing = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0
        self.mixer = BatchMixer(seed, info.num_classes, cfg.mixup_alpha, cfg.cutmix_alpha) if mixing else None
        self.n = len(split)
        self.world, self.rank = env.world_size, env.rank
        self.deal = PAIR if self.mixer is not None else 1  # consecutive samples of the global order a rank gets
        self.sampler = DistributedSampler(range(self.n), num_replicas=env.world_size, rank=env.rank,
                                          shuffle=True, seed=seed, drop_last=True)
        self._global = DistributedSampler(range(self.n), num_replicas=1, rank=0, shuffle=True, seed=seed,
                                          drop_last=True)  # the same permutation, before the ranks' stride
        self.steps_per_epoch = len(self.sampler) // (micro_batch * accum)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.global_batch_size={micro_batch * accum * env.world_size} is larger "
                              f"than the training split ({self.n} samples): lower train.global_batch_size")
        self.resident = ResidentSplit(split, info, device, channels_last) if resident else None
        self.loader, self.workers = None, 0
        if not resident:
            self._sampler = _ListSampler()
            self.workers = workers = worker_count(cfg.num_workers, env.local_world_size)
            self.loader = _loader(SampleKeyed(_as_dataset(split, info), seed), micro_batch, self._sampler, cfg,
                                  device, workers, seed * 1_000_003 + env.rank, list(ignore_signals))
        self.channels_last = channels_last

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for `epoch`: exactly DistributedSampler's (rank r takes the r-th of
        every world-size samples of the global order). With mixing, the same global batches are dealt in
        pairs instead (rank r takes the r-th of every world-size pairs), so that each micro-batch holds
        whole pairs: the global order and each step's global batch are the same either way."""
        if self.deal == 1:
            self.sampler.set_epoch(epoch)
            return torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        self._global.set_epoch(epoch)
        per_global = self.micro * self.accum * self.world
        steps = torch.tensor(list(iter(self._global))[: self.steps_per_epoch * per_global], dtype=torch.long)
        dealt = steps.view(self.steps_per_epoch, -1, self.world, self.deal)[:, :, self.rank]
        return dealt.reshape(-1)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        per_step = self.micro * self.accum
        idx = self.order(epoch)[start_step * per_step: self.steps_per_epoch * per_step]
        cpu_idx = idx
        if self.resident is not None:
            idx = idx.to(self.device, non_blocking=True)
            batches = (self.resident(idx[i: i + self.micro]) for i in range(0, len(idx), self.micro))
        else:
            self._sampler.indices = [(epoch, i) for i in idx.tolist()]
            batches = (to_device(x, y, self.device, self.channels_last) for x, y in _batches(self.loader))
        for b, (x, y) in enumerate(batches):  # in order, on both paths: batch b holds idx[b*micro:(b+1)*micro]
            if self.augment is not None:
                x = self.augment(x, epoch, idx[b * self.micro: (b + 1) * self.micro])
            if self.mixer is not None:  # soft targets [micro, classes] from here on
                x, y = self.mixer(x, y, epoch, cpu_idx[b * self.micro: (b + 1) * self.micro])
            yield x, y

    def close(self) -> None:
        shutdown(self.loader)


class EvalBatches:
    """This rank's share of the test split (rank::world, no padding) in equally many batches on every
    rank; a rank whose share ran out yields None, so collectives inside forward (FSDP) stay matched. A
    dataset that draws random numbers for its samples draws the same ones at every evaluation, in
    training and in the evaluate tool alike (keyed by seed and sample index)."""

    EVAL_EPOCH = -1  # the key's epoch part for evaluation: never a training epoch

    def __init__(self, split, info: DataInfo, env: DistEnv, cfg: DataConfig, batch_size: int,
                 device: torch.device, resident: bool, channels_last: bool = False,
                 ignore_signals: list[str] = (), seed: int = 0):
        self.n = len(split)
        self.shard = list(range(env.rank, self.n, env.world_size))
        self.batch, self.device, self.resident = batch_size, device, resident
        self.num_batches = math.ceil(math.ceil(self.n / env.world_size) / batch_size)
        self.channels_last = channels_last
        self.resident = ResidentSplit(split, info, device, channels_last) if resident else None
        self.loader = None
        if not resident:
            keyed = SampleKeyed(_as_dataset(split, info), seed)
            sub = torch.utils.data.Subset(keyed, [(self.EVAL_EPOCH, i) for i in self.shard])
            self._sampler = _ListSampler()  # empty until an evaluation: start_workers() fetches nothing
            self.loader = _loader(sub, batch_size, self._sampler, cfg, device, worker_count(cfg.num_workers,
                                  env.local_world_size), 0, list(ignore_signals))

    def start_workers(self) -> None:
        """Forks the persistent workers now, with an empty pass, instead of at the first evaluation: run.py
        calls it before training starts, when no collective is running. Seen twice in CI on Python 3.11.7:
        the evaluation worker, forked at the first evaluation just after a preemption vote, stuck for good
        in os.fork() (gdb: PyOS_AfterFork_Child -> _PyThreadState_DeleteExcept waiting on HEAD_LOCK, with a
        gloo thread among the inherited thread states), and its rank waited for a batch until the hang
        sentinel fired. That is CPython gh-112275 (a thread creating or dropping a Python thread state at
        the instant of a fork; Python 3.8 to 3.11.7, fixed in 3.12 and later 3.11 releases). The training
        loader forks its workers before the first step, likewise."""
        if self.loader is not None and self.loader.num_workers > 0 and self.loader._iterator is None:
            for _ in self.loader:
                pass

    def dummy_input(self) -> torch.Tensor:
        """One sample, for the forward a rank without data still runs to keep FSDP collectives matched."""
        if self.resident is not None:
            return self.resident(torch.zeros(1, dtype=torch.long, device=self.device))[0]
        return self.loader.dataset[0][0].unsqueeze(0).to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor] | None]:
        produced = 0
        if self.resident is not None:
            idx = torch.tensor(self.shard, dtype=torch.long, device=self.device)
            batches = (self.resident(idx[i: i + self.batch]) for i in range(0, len(idx), self.batch))
        else:
            self._sampler.indices = list(range(len(self.shard)))
            batches = (to_device(x, y, self.device, self.channels_last) for x, y in _batches(self.loader))
        for batch in batches:
            produced += 1
            yield batch
        for _ in range(self.num_batches - produced):
            yield None

    def close(self) -> None:
        shutdown(self.loader)
