"""The vision training recipe: EMA (checked against the raw weights' history, under DDP and FSDP, exact on
resume), SyncBatchNorm (1 vs 2 processes), mixup/CutMix (soft targets, exact resume), early stopping, the
best checkpoints kept across pruning, training accuracy, and quantized export."""
from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import CONFIGS, check, final_checkpoint, read_jsonl, run_engine, train_losses

pytestmark = pytest.mark.slow
SMOKE = str(CONFIGS / "cpu_smoke.yaml")
# The seed CNN without dropout on mnist_mini; SGD so that 1 process and FSDP on 2 differ by rounding only.
EMA = [SMOKE, "model.name=cnn", "optim.name=sgd", "optim.lr=0.05", "train.ema_decay=0.8", "train.max_steps=12",
       "train.log_every_steps=1", "checkpoint.every_steps=1", "checkpoint.keep_last=20"]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    check(run_engine([*EMA, f"run.root={root}", "run.name=one"]))
    return root


def test_ema_equals_the_average_of_the_raw_weights_history(ema_run):
    from ddp_train.config import load_config
    from ddp_train.data import load
    from ddp_train.engine.run import seed_everything
    from ddp_train.models import build_model

    cfg = load_config(ema_run / "one" / "config.yaml")
    seed_everything(cfg.run.seed)  # the initial weights, as the engine built them
    ema = {k: v.clone() for k, v in build_model(cfg.model, load(cfg.data).info).state_dict().items()}
    for step in range(1, 13):
        raw = torch.load(ema_run / "one" / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)["model"]
        ema = {k: 0.8 * ema[k] + 0.2 * raw[k] for k in ema}
    saved = final_checkpoint(ema_run / "one")["modules"]["ema"]
    assert max((saved[k] - ema[k]).abs().max().item() for k in ema) < 1e-6
    evals = [r for r in read_jsonl(ema_run / "one" / "metrics.jsonl") if "val_ema/top1" in r]
    summary = json.loads((ema_run / "one" / "summary.json").read_text())
    assert evals and summary["val_ema/top1"] == evals[-1]["val_ema/top1"]
    assert all(0 <= r["train/top1"] <= 1 for r in read_jsonl(ema_run / "one" / "metrics.jsonl") if "train/loss" in r)


def test_ema_under_fsdp_on_two_processes_matches_one_process(ema_run, tmp_path):
    check(run_engine([*EMA, "parallel.strategy=fsdp", "checkpoint.every_steps=null", f"run.root={tmp_path}",
                      "run.name=fsdp"], nproc=2))
    one, two = final_checkpoint(ema_run / "one"), final_checkpoint(tmp_path / "fsdp")
    assert max((one["modules"]["ema"][k] - two["modules"]["ema"][k]).abs().max().item() for k in one["model"]) < 1e-5


def test_ema_and_mixing_resume_bitwise(tmp_path):
    args = [*EMA, "checkpoint.every_steps=null", "data.mixup_alpha=0.4", "data.cutmix_alpha=1.0", f"run.root={tmp_path}"]
    check(run_engine([*args, "run.name=ref"]))
    check(run_engine([*args, "run.name=cut", "checkpoint.simulate_preempt_at_step=5"]), rc=75)
    check(run_engine([*args, "run.name=cut"]))
    ref, got = final_checkpoint(tmp_path / "ref"), final_checkpoint(tmp_path / "cut")
    for part in ("model", "ema"):
        a = ref["model"] if part == "model" else ref["modules"]["ema"]
        b = got["model"] if part == "model" else got["modules"]["ema"]
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert train_losses(tmp_path / "ref") == sorted(dict(train_losses(tmp_path / "cut")).items())
    rows = [r for r in read_jsonl(tmp_path / "ref" / "metrics.jsonl") if "train/loss" in r]
    assert rows and not any("train/top1" in r for r in rows)  # mixed batches are not accuracy


def test_mixed_targets_are_soft_labels_summing_to_one_and_keyed_per_sample():
    from ddp_train.data.mixing import BatchMixer

    mixer = BatchMixer(seed=3, num_classes=5, mixup_alpha=0.4, cutmix_alpha=1.0)
    x, y = torch.rand(8, 1, 12, 12), torch.arange(8) % 5
    index = torch.arange(100, 108)
    mixed, soft = mixer(x, y, epoch=2, index=index)
    assert soft.shape == (8, 5) and torch.allclose(soft.sum(1), torch.ones(8))
    assert (soft.max(1).values < 1).any()  # something was mixed
    again, soft2 = mixer(x, y, epoch=2, index=index)
    assert torch.equal(mixed, again) and torch.equal(soft, soft2)
    _, other = mixer(x, y, epoch=3, index=index)
    assert not torch.equal(soft, other)


def test_sync_batchnorm_makes_two_processes_train_like_one(tmp_path):
    args = [SMOKE, "model.name=resnet18", "data.name=synthetic", "data.synthetic_shape=[3,16,16]",
            "data.synthetic_test_size=64", "train.global_batch_size=32", "train.max_steps=4", "train.log_every_steps=1",
            "optim.name=sgd", "optim.lr=0.0005", f"run.root={tmp_path}"]
    # A small lr and few steps: this net is chaotic on these 16 px images; at lr 0.005 even a channels_last
    # run of one process drifts 2% from the plain one within 4 steps.
    check(run_engine([*args, "run.name=one"]))
    check(run_engine([*args, "run.name=sync", "parallel.sync_bn=true"], nproc=2))
    one, sync = train_losses(tmp_path / "one"), train_losses(tmp_path / "sync")
    assert len(one) == 4 and max(abs(a - b) / a for (_, a), (_, b) in zip(one, sync)) < 1e-4  # 10% without sync_bn
    state = final_checkpoint(tmp_path / "sync")["model"]
    ref = final_checkpoint(tmp_path / "one")["model"]
    assert torch.allclose(state["bn1.running_mean"], ref["bn1.running_mean"], atol=1e-5)  # global statistics


def test_early_stopping_stops_every_rank_after_the_evaluation_that_exhausts_patience(tmp_path):
    # lr 1e-9: nothing changes, val/top1 plateaus from the first evaluation; patience 2 -> stop at the third
    proc = check(run_engine([SMOKE, "train.max_steps=null", "train.epochs=8", "data.name=synthetic",
                             "data.synthetic_train_size=256", "optim.lr=1e-9", "train.early_stopping.patience=2",
                             "checkpoint.every_epochs=1", f"run.root={tmp_path}", "run.name=plateau"], nproc=2))
    summary = json.loads((tmp_path / "plateau" / "summary.json").read_text())
    steps_per_epoch = 256 // 32
    assert summary["stopped_early"] and summary["stopped_early_step"] == summary["step"] == 3 * steps_per_epoch
    assert "did not improve" in summary["stopped_early_reason"] and "early stopping:" in proc.stdout
    evals = [r["step"] for r in read_jsonl(tmp_path / "plateau" / "metrics.jsonl") if "val/top1" in r]
    assert evals == [8, 16, 24]  # no evaluation after the stop, the final one is the third
    final = final_checkpoint(tmp_path / "plateau")
    assert final["progress"]["step"] == 24 and final["early_stopping"]["reason"] == summary["stopped_early_reason"]


def test_keep_best_keeps_the_best_checkpoint_through_keep_last_pruning(tmp_path):
    from ddp_train.engine.best import BestCheckpoints
    from ddp_train.rundir import checkpoints as ckpt

    best = BestCheckpoints(keep=1, metric="val/loss")
    for step, loss in ((1, 0.9), (2, 0.5), (3, 0.7), (4, 0.8)):  # the best (lowest loss) is step 2
        best.offer(step, {"val/loss": loss})
        ckpt.write_checkpoint(tmp_path, step, {"format": 2, "model": {}, "extra": {"step": step}})
        ckpt.prune(tmp_path, keep_last=1, protect=best.steps())
        best.write_pointer(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["step_00000002.pt", "step_00000004.pt"]
    assert ckpt.best_checkpoint(tmp_path) == tmp_path / "step_00000002.pt"


def test_a_run_with_keep_best_names_its_best_evaluation(tmp_path):
    check(run_engine([SMOKE, "train.max_steps=null", "train.epochs=4", "data.name=synthetic", "data.synthetic_train_size=256",
                      "checkpoint.keep_last=1", "checkpoint.keep_best=1", "checkpoint.every_epochs=1",
                      f"run.root={tmp_path}", "run.name=best"]))
    evals = [r for r in read_jsonl(tmp_path / "best" / "metrics.jsonl") if "val/top1" in r]
    top = max(evals, key=lambda r: (r["val/top1"], -r["step"]))
    pointer = json.loads((tmp_path / "best" / "checkpoints" / "best.json").read_text())
    assert pointer["step"] == top["step"] and (tmp_path / "best" / "checkpoints" / pointer["file"]).is_file()


def test_quantized_export_keeps_top1_within_the_bar_and_is_smaller(ema_run):
    import subprocess
    import sys

    from conftest import ROOT, engine_env

    proc = subprocess.run([sys.executable, "-m", "ddp_train.export", str(ema_run / "one"), "--quantize", "dynamic",
                           "--ema"], cwd=ROOT, env=engine_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"top-1 fp32 ([\d.]+), int8 ([\d.]+) \(drop (-?[\d.]+) points", proc.stdout)
    assert m and float(m[3]) <= 1.0 and abs(float(m[1]) - float(m[2])) <= 0.01, proc.stdout
    sizes = re.search(r"size fp32 ([\d.]+) MB, int8 ([\d.]+) MB", proc.stdout)
    assert float(sizes[2]) < float(sizes[1]) / 2
    assert "static (FX): convolutions" in proc.stdout and (ema_run / "one" / "export" / "model.int8.pt").is_file()
