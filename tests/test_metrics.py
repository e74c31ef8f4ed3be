"""Exact evaluation sums: counts are int64 on the device, the confusion matrix agrees with a direct
count, and a class count too large for a dense C x C matrix keeps per-class counts only."""
from __future__ import annotations

import torch
from torch import nn

from ddp_train.config import DataConfig
from ddp_train.data import DataInfo, EvalBatches, ImageTensors
from ddp_train.engine.evaluation import MAX_CONFUSION_CLASSES, evaluate
from ddp_train.env import DistEnv


def batches(classes: int, n: int = 257) -> tuple[EvalBatches, ImageTensors]:
    g = torch.Generator().manual_seed(0)
    split = ImageTensors(torch.randint(0, 256, (n, 1, 2, 2), dtype=torch.uint8, generator=g),
                         torch.randint(0, classes, (n,), generator=g))
    info = DataInfo(classes, 1, (2, 2), (0.5,), (0.25,))
    return EvalBatches(split, info, DistEnv(), DataConfig(), 64, torch.device("cpu"), resident=True), split


def test_confusion_is_int64_and_equals_a_direct_count():
    torch.manual_seed(0)
    evals, split = batches(7)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 7))
    result = evaluate(model, evals, 7, torch.device("cpu"))
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x, _ in evals if x is not None])
    direct = torch.zeros(7, 7, dtype=torch.int64)
    for t, p in zip(split.labels.tolist(), pred.tolist()):
        direct[t, p] += 1
    assert result["confusion"].dtype == torch.int64 and torch.equal(result["confusion"], direct)
    correct, total = result["per_class"]
    assert torch.equal(correct, direct.diagonal()) and torch.equal(total, direct.sum(1))
    assert result["count"] == 257 and result["top1"] == direct.diagonal().sum().item() / 257


def test_many_classes_skip_the_dense_matrix_but_keep_per_class_accuracy():
    classes = MAX_CONFUSION_CLASSES + 1
    evals, split = batches(classes)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, classes))
    result = evaluate(model, evals, classes, torch.device("cpu"))
    assert result["confusion"] is None
    correct, total = result["per_class"]
    assert total.sum().item() == 257 and torch.equal(total, torch.bincount(split.labels, minlength=classes))
    assert correct.sum().item() == round(result["top1"] * 257)


def test_a_log_window_reads_the_same_at_any_world_size():
    from ddp_train.engine.train_metrics import perf_metrics, window_metrics

    # 3 steps of one global batch of 64, losses 1.0, 0.5, 0.3 and 40+50+60 correct: as one rank sums
    # them, and as two ranks sum them after the all-reduce (each rank adds its own 32 samples' mean loss
    # per step: 0.9+1.1, 0.45+0.55, 0.35+0.25)
    one = window_metrics([1.8, 150, 192], steps=3, timed=3, world_size=1, global_batch=64, seconds=1.5,
                         wait_s=0.3, lr=0.1)
    two = window_metrics([1.7 + 1.9, 70 + 80, 96 + 96], steps=3, timed=3, world_size=2, global_batch=64,
                         seconds=1.5, wait_s=0.3, lr=0.1)
    assert one == two
    assert one["train/loss"] == 0.6 and one["train/top1"] == 150 / 192
    assert one["train/samples_per_s"] == 128 and one["train/step_time_s"] == 0.5
    assert abs(one["train/data_wait_frac"] - 0.2) < 1e-12
    skipped = window_metrics([0.0, 0, 0], steps=0, timed=2, world_size=2, global_batch=64, seconds=1.0,
                             wait_s=2.0, lr=0.1)  # every step skipped by the NaN guard, soft targets
    assert "train/loss" not in skipped and "train/top1" not in skipped and skipped["train/data_wait_frac"] == 1.0
    perf = perf_metrics(1e9, samples_per_s=2000, world_size=2, peak_tflops=4.0)
    assert perf == {"perf/tflops_per_device": 1.0, "perf/mfu": 0.25}
    assert perf_metrics(1e9, 2000, 2, None) == {"perf/tflops_per_device": 1.0}
