"""The contenders of benchmarks/peers.py: one identical workload (the seeds' CNN with dropout 0.5, Adam 1e-3
constant, fp32, global batch 64, the 4000 mnist_mini training digits) trained by

  hand        a hand-written loop over pre-normalised tensors, batches sliced by a random permutation
  hand_dl     the same loop fed by a DataLoader (per-sample normalisation, num_workers=2)
  lightning   Lightning Trainer (no logger, checkpointing, progress bar or model summary)
  fabric      Lightning Fabric
  accelerate  Hugging Face Accelerate
  (ddp_train  is `python -m ddp_train model.name=peer_loops:cnn ...`, launched by peers.py)

  python benchmarks/peer_loops.py CONTENDER --data-path device|dataloader --device cpu|cuda
  torchrun --standalone --nproc_per_node=2 benchmarks/peer_loops.py CONTENDER ...

Every contender trains `PeerCNN`, whose forward (in training mode) is the benchmark's only hook: every
`window` steps it reports the window just done (wall time and ru_minflt delta, waits excluded) to the
coordinator and blocks until the coordinator gives this contender its next turn. So every contender is
timed by the same code at the same point of its step. The hook's settings come from PEERS_* environment
variables set by peers.py; without them the model is a plain CNN and the script just trains.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

MEAN, STD = 0.1307, 0.3081  # ddp_train's MNIST_STATS
GLOBAL_BATCH = 64
TRAIN_SAMPLES = 4000


# ------------------------------------------------------------------------------------------ the hook
class Gate:
    """Turns handed out by peers.py through FIFOs: DIR/NAME.RANK.go (one byte per turn: g = go, q = quit)
    and DIR/reports (one JSON line per rank per window)."""

    def __init__(self, env=os.environ):
        self.dir, self.name = env["PEERS_DIR"], env["PEERS_NAME"]
        self.window = int(env["PEERS_WINDOW"])
        self.startup_steps = int(env.get("PEERS_STARTUP_STEPS", "0"))  # >0: the start-up pass
        self.rank = int(env.get("RANK", "0"))
        self.count = 0
        self.go = self.out = None
        self.t0 = self.flt0 = 0.0

    def _report(self, **fields) -> None:
        if self.out is None:
            self.out = os.open(os.path.join(self.dir, "reports"), os.O_WRONLY)
        line = json.dumps({"name": self.name, "rank": self.rank, **fields}) + "\n"
        os.write(self.out, line.encode())  # < PIPE_BUF: one atomic write

    def _wait(self) -> None:
        if self.go is None:
            self.go = os.open(os.path.join(self.dir, f"{self.name}.{self.rank}.go"), os.O_RDONLY)
        token = os.read(self.go, 1)
        if token != b"g":  # q, or the coordinator is gone (EOF)
            sys.stdout.flush()
            os._exit(0 if token == b"q" else 1)

    def step(self, device: torch.device) -> None:
        """Called at the start of every training forward."""
        n, self.count = self.count, self.count + 1
        if self.startup_steps:
            if n == self.startup_steps:  # epoch 1 done: steps 0..startup_steps-1 ran
                self._report(startup_end=time.time(), maxrss_kb=_maxrss_kb())
                os._exit(0)
            return
        if n % self.window:
            return
        if n:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t, flt = time.perf_counter(), _minflt()
            self._report(window=n // self.window - 1, steps=self.window, wall=t - self.t0,
                         minflt=flt - self.flt0, maxrss_kb=_maxrss_kb())
        else:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            self._report(ready=True, threads=torch.get_num_threads(),
                         world=torch.distributed.get_world_size() if dist else 1)
        self._wait()
        self.flt0, self.t0 = _minflt(), time.perf_counter()


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class PeerCNN(nn.Module):
    """ddp_train's SeedCNN (cnn_dropout): conv 1->32, pool, conv 32->64, pool, fc 3136->128, dropout, fc."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * (image_size // 4) ** 2, 128), nn.ReLU(),
                                        nn.Dropout(dropout), nn.Linear(128, num_classes))
        self.gate = Gate() if "PEERS_DIR" in os.environ else None
        if os.environ.get("PEERS_THREADS"):  # the same intra-op threads in every contender, whatever it set
            torch.set_num_threads(int(os.environ["PEERS_THREADS"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # not the engine's probes: meta (FLOPs) and fake tensors (train.channels_last=auto)
        probe = x.device.type == "meta" or type(x) is not torch.Tensor
        if self.gate is not None and self.training and torch.is_grad_enabled() and not probe:
            self.gate.step(x.device)
        return self.classifier(self.features(x))


def cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs) -> PeerCNN:
    """The factory ddp_train calls for `model.name=peer_loops:cnn`."""
    return PeerCNN(num_classes, in_channels, image_size, **kwargs)


# ------------------------------------------------------------------------------------------ the data
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """mnist_mini's training split, from ddp_train's own loader (the same digits for every contender):
    uint8 [4000, 1, 28, 28] and int64 labels."""
    from ddp_train.config import DataConfig
    from ddp_train.data.sources import load

    train = load(DataConfig(name="mnist_mini")).train
    return train.images, train.labels


class DeviceBatches:
    """This rank's batches of an epoch, sliced from the pre-normalised split on the device by a seeded
    permutation (the same on every rank; rank r takes every world-th sample). Sized, so a framework
    knows the epoch's length."""

    def __init__(self, images, labels, batch: int, rank: int, world: int, device: torch.device, seed: int = 0):
        self.x = ((images.to(device).float() / 255 - MEAN) / STD)
        self.y = labels.to(device)
        self.batch, self.rank, self.world, self.device, self.seed = batch, rank, world, device, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.y) // self.world // self.batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        n = len(self) * self.batch * self.world
        perm = torch.randperm(len(self.y), generator=g)[:n].to(self.device)
        for idx in perm[self.rank::self.world].view(-1, self.batch):
            yield self.x[idx], self.y[idx]


class Digits(torch.utils.data.Dataset):
    """Per-sample normalisation (what ddp_train's DataLoader path does: NormalisedTensors)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return (self.images[i].float().div(255) - MEAN) / STD, self.labels[i]


def loader(images, labels, batch: int, device: torch.device, sampler=None) -> torch.utils.data.DataLoader:
    """The DataLoader every contender's DataLoader path uses: 2 persistent workers, prefetch 4 (as
    ddp_train's), pinned memory on CUDA. Without a sampler it shuffles (the frameworks shard it)."""
    return torch.utils.data.DataLoader(Digits(images, labels), batch_size=batch, shuffle=sampler is None,
                                       sampler=sampler, num_workers=2, persistent_workers=True,
                                       prefetch_factor=4, drop_last=True, pin_memory=device.type == "cuda",
                                       generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------ contenders
def world() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def model_and_opt(device):
    torch.manual_seed(0)  # ddp_train's run.seed=0 before it builds the model
    model = cnn().to(device)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def hand(args, device, use_loader: bool) -> None:
    rank, size, _ = world()
    if size > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    images, labels = digits()
    model, opt = model_and_opt(device)
    if size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    batch = GLOBAL_BATCH // size
    sampler = None
    if use_loader:
        sampler = (torch.utils.data.DistributedSampler(range(len(labels)), size, rank, shuffle=True, seed=0,
                                                       drop_last=True) if size > 1 else None)
        batches = loader(images, labels, batch, device, sampler)
    else:
        batches = DeviceBatches(images, labels, batch, rank, size, device)
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()


def lightning(args, device, use_loader: bool) -> None:
    import lightning as L

    rank, size, local = world()
    images, labels = digits()

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = cnn()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=local,
                        num_nodes=size // local, strategy="ddp" if size > 1 else "auto", precision="32-true",
                        max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    # device path: an iterable of batches already on the device (Lightning does not re-shard a plain
    # iterable); DataLoader path: Lightning puts its DistributedSampler into the shuffling loader.
    batch = GLOBAL_BATCH // size
    data = (loader(images, labels, batch, device) if use_loader
            else DeviceBatches(images, labels, batch, rank, size, device))
    trainer.fit(Module(), train_dataloaders=data)


def fabric(args, device, use_loader: bool) -> None:
    from lightning.fabric import Fabric

    rank, size, local = world()
    f = Fabric(accelerator="cuda" if device.type == "cuda" else "cpu", devices=local, num_nodes=size // local,
               strategy="ddp" if size > 1 else "auto", precision="32-true")
    f.launch()
    images, labels = digits()
    model, opt = model_and_opt(f.device)
    model, opt = f.setup(model, opt)
    model.train()
    batch = GLOBAL_BATCH // size
    data = (f.setup_dataloaders(loader(images, labels, batch, f.device)) if use_loader
            else DeviceBatches(images, labels, batch, rank, size, f.device))
    for _ in range(args.epochs):
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            f.backward(loss)
            opt.step()


def accelerate(args, device, use_loader: bool) -> None:
    from accelerate import Accelerator

    acc = Accelerator(cpu=device.type == "cpu")
    rank, size = acc.process_index, acc.num_processes
    images, labels = digits()
    model, opt = model_and_opt(acc.device)
    batch = GLOBAL_BATCH // size
    if use_loader:  # Accelerate shards the shuffling loader itself
        model, opt, data = acc.prepare(model, opt, loader(images, labels, batch, acc.device))
    else:
        model, opt = acc.prepare(model, opt)
        data = DeviceBatches(images, labels, batch, rank, size, acc.device)
    model.train()
    for _ in range(args.epochs):
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            acc.backward(loss)
            opt.step()


CONTENDERS = {"hand": lambda a, d: hand(a, d, False), "hand_dl": lambda a, d: hand(a, d, True),
              "lightning": lambda a, d: lightning(a, d, a.data_path == "dataloader"),
              "fabric": lambda a, d: fabric(a, d, a.data_path == "dataloader"),
              "accelerate": lambda a, d: accelerate(a, d, a.data_path == "dataloader")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("contender", choices=list(CONTENDERS))
    p.add_argument("--data-path", default="device", choices=["device", "dataloader"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--epochs", type=int, default=100_000, help="the coordinator ends the run long before")
    args = p.parse_args()
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    CONTENDERS[args.contender](args, device)


if __name__ == "__main__":
    main()
