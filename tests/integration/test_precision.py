"""Mixed precision and memory format paths: bf16 autocast + channels_last (DDP), bf16 through FSDP2's
MixedPrecisionPolicy (fp32 master weights), and torch.compile on CUDA (skipped without a GPU)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import CONFIGS, check, final_checkpoint, run_engine, train_losses

pytestmark = pytest.mark.slow
CNN = [str(CONFIGS / "cpu_smoke.yaml"), "model.name=cnn", "train.max_steps=30"]


def assert_learned(run_dir):
    losses = [loss for _, loss in train_losses(run_dir)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_bf16_autocast_with_channels_last_trains(runs):
    check(run_engine([*CNN, f"run.root={runs}", "run.name=bf16", "train.precision=bf16",
                      "train.channels_last=true"]))
    assert_learned(runs / "bf16")
    summary = json.loads((runs / "bf16" / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["val/top1"] > 0.5
    assert all(t.dtype == torch.float32 for t in final_checkpoint(runs / "bf16")["model"].values())


def test_fsdp_bf16_uses_the_mixed_precision_policy_and_keeps_fp32_weights(runs):
    check(run_engine([*CNN, f"run.root={runs}", "run.name=fsdp_bf16", "train.precision=bf16",
                      "parallel.strategy=fsdp"], nproc=2))
    assert_learned(runs / "fsdp_bf16")
    assert all(t.dtype == torch.float32 for t in final_checkpoint(runs / "fsdp_bf16")["model"].values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compile + bf16 on cuda)")
def test_compile_bf16_channels_last_on_cuda(runs):
    check(run_engine([*CNN, f"run.root={runs}", "run.name=gpu", "train.precision=bf16", "train.compile=default",
                      "train.channels_last=true"], timeout=900))
    assert_learned(runs / "gpu")
    summary = json.loads((runs / "gpu" / "summary.json").read_text())
    assert summary["cuda_available"] and summary["peak_gpu_mem_gb_per_rank"][0] > 0
