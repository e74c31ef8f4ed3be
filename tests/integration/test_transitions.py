"""A resume holds on every transition a user makes between the legs of a run: strategy (ddp <-> fsdp),
world size (1, 2, 3), memory layout (channels_last on <-> off), optimizer kernels (fused, foreach,
for_loop), accumulation, mixup, with EMA throughout; and best-k and early stopping across a resume.
Each cell is checked against the uninterrupted run: bitwise where world size and layout stay, else at
the world-size tests' tolerance (fp32 reduction order). A model without batch norm, so nothing but the
reduction order may differ; the suite's other resume tests keep one layout throughout, which is how
fused Adam trained on optimizer state in the other layout unnoticed (2.8e-2 off after 6 steps).

Processes are shared: each first leg is an uninterrupted run's own step-6 checkpoint (a crash right
after it) or one preempted leg, copied once per cell that resumes from it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import CONFIGS, check, final_checkpoint, max_param_diff, read_jsonl, run_engine, train_losses

pytestmark = pytest.mark.slow
# 40 steps an epoch, 12 in all, saved every 6; EMA on in every run (its weights are compared too).
BASE = [str(CONFIGS / "cpu_smoke.yaml"), "model.name=cnn", "data.name=synthetic", "data.synthetic_shape=[3,16,16]",
        "data.synthetic_train_size=480", "data.synthetic_test_size=48", "train.global_batch_size=12",
        "train.log_every_steps=1", "data.augment=false", "sched.name=constant", "train.max_steps=12",
        "checkpoint.every_steps=6", "train.ema_decay=0.9"]
MIX = ["data.mixup_alpha=0.2", "data.cutmix_alpha=1.0"]
# The world-size tests' loss tolerance (their runs differ by 1e-7). Weights: Adam's normalised update moves an
# element whose gradient is ~0 by up to lr whatever that gradient's last bits, so legs that differ by reduction
# order differ there by more than their losses do (the fsdp leg's classifier weight: 2.3e-5 at step 6, before
# any resume); the layout fault moved weights by 7e-3 a step.
TOL_LOSS, TOL_PARAM = 1e-4, 1e-4


def _run(root: Path, name: str, args: list[str], nproc: int, rc: int = 0) -> Path:
    check(run_engine([*BASE, *args, f"run.root={root}", f"run.name={name}"], nproc=nproc), rc=rc)
    return root / name


def _crashed_after_step_6(run_dir: Path, into: Path) -> Path:
    """A copy of an uninterrupted run as a crash right after its step-6 checkpoint leaves it."""
    shutil.copytree(run_dir, into)
    for late in (into / "checkpoints").glob("step_00000012*"):
        late.unlink()
    (into / "summary.json").unlink()
    return into


@pytest.fixture(scope="module")
def legs(tmp_path_factory):
    """The uninterrupted references and the first legs the cells resume from."""
    root = tmp_path_factory.mktemp("transitions")
    ref = _run(root, "ref", [], 2)  # ddp, 2 processes, channels_last (auto on CPU convs), fused Adam
    mix = _run(root, "mix", MIX, 2)
    fsdp = _run(root, "fsdp", ["parallel.strategy=fsdp", "checkpoint.simulate_preempt_at_step=6"], 2, rc=1)
    nchw = _run(root, "nchw", ["train.channels_last=false", "checkpoint.simulate_preempt_at_step=6"], 1, rc=75)
    return {"root": root, "ref": ref, "mix": mix, "first": {"ref": _crashed_after_step_6(ref, root / "ref6"),
            "mix": _crashed_after_step_6(mix, root / "mix6"), "fsdp": fsdp, "nchw": nchw}}


# (cell id, first leg, resume overrides, processes, bitwise, uninterrupted run)
CELLS = [
    ("same", "ref", [], 2, True, "ref"),
    ("ddp-to-fsdp", "ref", ["parallel.strategy=fsdp"], 2, False, "ref"),
    ("channels_last-to-nchw-on-1", "ref", ["train.channels_last=false"], 1, False, "ref"),
    ("fused-to-foreach-on-3", "ref", ["optim.implementation=foreach"], 3, False, "ref"),
    ("fused-to-for_loop", "ref", ["optim.implementation=for_loop"], 2, False, "ref"),
    ("accumulation-1-to-2", "ref", ["train.grad_accum_steps=2"], 2, False, "ref"),
    ("fsdp-to-ddp", "fsdp", [], 2, False, "ref"),
    ("fsdp-2-to-1", "fsdp", [], 1, False, "ref"),
    ("fsdp-2-to-3", "fsdp", ["parallel.strategy=fsdp"], 3, False, "ref"),
    ("nchw-to-channels_last-on-2", "nchw", [], 2, False, "ref"),
    ("mixup-2-to-3", "mix", MIX, 3, False, "mix"),
    ("mixup-2-to-1-accumulation-2", "mix", [*MIX, "train.grad_accum_steps=2"], 1, False, "mix"),  # micro 6
]


@pytest.mark.parametrize("cell, first, overrides, nproc, bitwise, reference", CELLS, ids=[c[0] for c in CELLS])
def test_a_resume_across_the_transition_continues_the_uninterrupted_run(legs, cell, first, overrides, nproc,
                                                                         bitwise, reference):
    root = legs["root"]
    shutil.copytree(legs["first"][first], root / cell)
    got_dir = _run(root, cell, overrides, nproc)
    ref_dir = legs[reference]
    ref, got = final_checkpoint(ref_dir), final_checkpoint(got_dir)
    assert got["progress"]["step"] == 12
    ref_losses, got_losses = dict(train_losses(ref_dir)), dict(train_losses(got_dir))
    assert sorted(got_losses) == list(range(1, 13))  # each step logged once, the replayed ones included
    resumed = [(s, ref_losses[s], got_losses[s]) for s in range(7, 13)]
    if bitwise:
        assert [r for _, r, _ in resumed] == [g for _, _, g in resumed]
        assert max_param_diff(ref["model"], got["model"]) == 0.0
        assert max_param_diff(ref["modules"]["ema"], got["modules"]["ema"]) == 0.0
        return
    worst = max(abs(r - g) / abs(r) for _, r, g in resumed)
    assert worst < TOL_LOSS, f"{cell}: steps 7-12 differ by up to {worst:.1e} from the uninterrupted run: {resumed}"
    assert max_param_diff(ref["model"], got["model"]) < TOL_PARAM
    assert max_param_diff(ref["modules"]["ema"], got["modules"]["ema"]) < TOL_PARAM


# Best-k and early stopping across a resume at an epoch boundary. lr 1e-9: val/top1 stays put, so the first
# evaluation stays the best and patience 2 stops the run at its third; the step checkpoint of each epoch's
# last step is written before that epoch's evaluation (every_steps = steps per epoch).
PLATEAU = ["data.synthetic_train_size=48", "train.max_steps=null", "optim.lr=1e-9", "checkpoint.every_steps=4",
           "checkpoint.keep_last=1", "checkpoint.keep_best=1", "checkpoint.best_metric=val/top1",
           "train.early_stopping.patience=2", "train.early_stopping.metric=val/top1", "train.ema_decay=null"]


def test_best_k_and_early_stopping_carry_across_a_resume_at_an_epoch_boundary(tmp_path):
    from ddp_train.rundir.checkpoints import best_checkpoint

    whole = _run(tmp_path, "whole", [*PLATEAU, "train.epochs=6"], 1)
    _run(tmp_path, "split", [*PLATEAU, "train.epochs=2"], 1)
    split = _run(tmp_path, "split", [*PLATEAU, "train.epochs=6"], 1)
    for run_dir in (whole, split):
        summary = json.loads((run_dir / "summary.json").read_text())
        stop = summary["stopped_early"], summary.get("stopped_early_step")
        assert stop == (True, 12), f"{run_dir.name}: stopped early {stop}, uninterrupted: at 12"
        assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "val/top1" in r] == [4, 8, 12]
    for run_dir in (whole, split):
        pointer = json.loads((run_dir / "checkpoints" / "best.json").read_text())
        assert pointer["step"] == 4 and best_checkpoint(run_dir / "checkpoints").is_file()
        kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt"))
        assert kept == ["step_00000004.pt", "step_00000012.pt"]  # the best, and keep_last=1
