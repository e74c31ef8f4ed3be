"""Mixed precision and memory format paths: bf16 autocast + channels_last (DDP), bf16 through FSDP2's
MixedPrecisionPolicy (fp32 master weights), and torch.compile on CUDA (skipped without a GPU)."""
from __future__ import annotations

import json
import math

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


@pytest.mark.parametrize("model", ["resnet18", "efficientnet_b0"])
def test_fsdp_bf16_trains_batchnorm_models_with_fp32_norm_layers(runs, model):
    """MixedPrecisionPolicy(bf16) on a BatchNorm model failed with "expected scalar type BFloat16 but found
    Float": the norm layers are their own FSDP units in fp32 now."""
    check(run_engine([str(CONFIGS / "cpu_smoke.yaml"), f"model.name={model}", "data.name=synthetic",
                      "data.synthetic_shape=[3,32,32]", "data.synthetic_test_size=64", "train.max_steps=3",
                      "train.global_batch_size=8", "train.log_every_steps=1", "parallel.strategy=fsdp",
                      "train.precision=bf16", f"run.root={runs}", f"run.name={model}"], nproc=2))
    losses = [loss for _, loss in train_losses(runs / model)]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
    state = final_checkpoint(runs / model)["model"]
    assert all(t.dtype in (torch.float32, torch.int64) for t in state.values())
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    assert means and any(m.abs().sum() > 0 for m in means)  # the running statistics were updated


def test_fsdp_bf16_on_one_process_still_autocasts(runs):
    """One process is not sharded, so FSDP's policy cannot cast: it must run autocast, exactly as DDP does
    (it used to train in fp32 without a word)."""
    for name, strategy in (("fsdp1", "fsdp"), ("ddp1", "ddp")):
        check(run_engine([*CNN, "train.max_steps=10", "train.log_every_steps=1", "train.precision=bf16",
                          f"parallel.strategy={strategy}", f"run.root={runs}", f"run.name={name}"]))
    assert train_losses(runs / "fsdp1") == train_losses(runs / "ddp1")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compile + bf16 on cuda)")
def test_compile_bf16_channels_last_on_cuda(runs):
    check(run_engine([*CNN, f"run.root={runs}", "run.name=gpu", "train.precision=bf16", "train.compile=default",
                      "train.channels_last=true"], timeout=900))
    assert_learned(runs / "gpu")
    summary = json.loads((runs / "gpu" / "summary.json").read_text())
    assert summary["cuda_available"] and summary["peak_gpu_mem_gb_per_rank"][0] > 0
