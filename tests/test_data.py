"""Dataset loading from real on-disk formats, and the per-rank sample order/sharding contracts."""
import gzip
import struct

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from ddp_train.config import DataConfig
from ddp_train.data import EvalBatches, TrainBatches
from ddp_train.datasets import load
from ddp_train.dist import DistEnv
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
