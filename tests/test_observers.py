"""The pieces behind the hang sentinel, NaN guard, FLOP count and crash-resume history, in process (the
real-process behaviour is in tests/integration/test_observability.py)."""
from __future__ import annotations

import json
import time

import pytest

from ddp_train.data import DataInfo
from ddp_train.engine.nan_guard import NanGuard, spans
from ddp_train.engine.sentinel import HangSentinel, behind, report
from ddp_train.errors import HUNG_EXIT
from ddp_train.models import SeedCNN, mlp
from ddp_train.tracking.flops import analytic_forward_flops, count_flops
from ddp_train.tracking.loggers import JsonlLogger

MNIST = DataInfo(num_classes=10, in_channels=1, image_size=(28, 28), mean=(0.1307,), std=(0.3081,))


def test_the_seed_cnn_counts_its_analytic_flops():
    forward = analytic_forward_flops(SeedCNN(1, 10, (28, 28), 0.5), (1, 28, 28))
    assert forward == pytest.approx(8.48e6, rel=0.01)  # the tutorial CNN: ~8.5 MFLOP per sample
    counted = count_flops(lambda: SeedCNN(1, 10, (28, 28), 0.5), (1, 28, 28))
    assert counted["forward"] == pytest.approx(forward, rel=0.10)
    assert counted["train"] == pytest.approx(3 * forward, rel=0.10)


def test_flops_of_a_model_instance_and_of_one_that_cannot_run_on_meta():
    from ddp_train.config import ModelConfig

    instance = mlp(ModelConfig(name="mlp"), MNIST)  # built on the CPU already: copied to meta
    counted = count_flops(lambda: instance, (1, 28, 28))
    assert counted["forward"] == pytest.approx(2 * (784 * 512 + 512 * 256 + 256 * 10), rel=0.01)
    assert next(instance.parameters()).device.type == "cpu"  # the user's module is untouched

    def needs_data():
        import torch

        class Picky(torch.nn.Module):
            def forward(self, x):
                return x[x > 0]  # data-dependent shape: no meta kernel can size it
        return Picky()
    assert count_flops(needs_data, (1, 4, 4)) is None


def test_the_nan_guard_counts_a_streak_and_remembers_the_batches_it_skipped():
    guard = NanGuard(True, max_bad_steps=3)
    assert not guard.record(1, True)
    assert [guard.record(s, False) for s in (2, 3)] == [False, False]
    assert not guard.record(4, True)  # a good step ends the streak
    assert [guard.record(s, False) for s in (5, 6, 7)] == [False, False, True]
    assert guard.rolled_back() == [5, 6, 7] and guard.skipped == 5
    state = json.loads(json.dumps(guard.state_dict()))  # a checkpoint holds it
    other = NanGuard(True, 3)
    other.load_state_dict(state)
    assert other.skip_steps == {5, 6, 7} and other.rollbacks == 1 and spans([5, 6, 7, 9]) == "5-7, 9"


def _rec(rank, step, phase, age=0.0):
    return {"rank": rank, "host": f"n{rank}", "pid": 100 + rank, "step": step, "phase": phase, "idle_s": 0.0,
            "time": time.time() - age, "seq": 1}


def test_behind_names_a_silent_rank_then_a_lagging_one_then_the_odd_phase():
    assert behind({0: _rec(0, 9, "step"), 1: _rec(1, 9, "data", age=60)}, 1.0)[0] == [1]
    assert behind({0: _rec(0, 9, "step"), 1: _rec(1, 8, "step"), 2: _rec(2, 9, "step")}, 1.0)[0] == [1]
    assert behind({0: _rec(0, 9, "step"), 1: _rec(1, 9, "eval"), 2: _rec(2, 9, "step")}, 1.0)[0] == [1]
    ranks, why = behind({0: _rec(0, 9, "log"), 1: _rec(1, 9, "log")}, 1.0)
    assert ranks == [0, 1] and "every rank waits in phase log" in why
    assert "behind: rank 1: never sent a heartbeat" in report({0: _rec(0, 3, "step"), 1: None}, 1.0, 10, _NoDir())


class _NoDir:
    def __truediv__(self, name):
        from pathlib import Path
        return Path("/nonexistent") / name


def test_a_sentinel_with_no_progress_dumps_its_stack_and_exits_hung(tmp_path):
    codes = []
    sentinel = HangSentinel(0, 1, tmp_path / "hang", timeout_s=5, init_timeout_s=5, exit_fn=codes.append)
    sentinel.warm = True
    sentinel.start(step=7)
    deadline = time.time() + 15
    while not codes and time.time() < deadline:
        time.sleep(0.1)
    sentinel.stop()
    assert codes == [HUNG_EXIT]
    assert "step 7" in (tmp_path / "hang" / "rank0.txt").read_text()
    assert "behind: rank 0 on" in (tmp_path / "hang" / "report.txt").read_text()


def test_metrics_jsonl_goes_back_to_the_rows_a_checkpoint_saw(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = JsonlLogger(path)
    for step in (1, 2):
        first.log_metrics({"train/loss": float(step)}, step)
    saved = first.state_dict()  # the checkpoint at step 2
    first.log_metrics({"train/loss": 3.0}, 3)  # then a crash
    first.finish()
    resumed = JsonlLogger(path)
    assert resumed.rows == 3
    resumed.load_state_dict(saved)
    resumed.log_metrics({"train/loss": 30.0}, 3)  # the replayed step
    resumed.finish()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_a_moved_run_directory_still_cuts_its_own_metrics_and_never_another_runs(tmp_path):
    """SIGKILL after step 3, the run directory moved (or mounted elsewhere on a requeue node), resumed from
    the step-2 checkpoint: step 3 appears once. Another run's checkpoint (resume=PATH) cuts nothing."""
    path = tmp_path / "a" / "metrics.jsonl"
    path.parent.mkdir()
    first = JsonlLogger(path)
    for step in (1, 2):
        first.log_metrics({"train/loss": float(step)}, step)
    saved = first.state_dict()  # the checkpoint at step 2
    first.log_metrics({"train/loss": 3.0}, 3)  # then SIGKILL
    first.finish()
    other = JsonlLogger(tmp_path / "other.jsonl")
    other.log_metrics({"train/loss": 9.0}, 1)
    other.finish()
    moved = tmp_path / "moved" / "a"
    moved.parent.mkdir()
    path.parent.rename(moved)
    resumed = JsonlLogger(moved / "metrics.jsonl")
    resumed.load_state_dict(other.state_dict() | {"rows": 0})  # not its file: untouched
    assert resumed.rows == 3
    resumed.load_state_dict(saved)
    resumed.log_metrics({"train/loss": 30.0}, 3)
    resumed.finish()
    assert [r["step"] for r in map(json.loads, (moved / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]


def test_the_guard_changes_nothing_in_a_run_without_nans(tmp_path):
    """The norm is read, never written: guard on and off end on bitwise the same weights (fp32)."""
    import torch
    from conftest import CONFIGS

    from ddp_train.config import load_config
    from ddp_train.engine.run import run

    finals = []
    for on in ("true", "false"):
        args = [f"run.root={tmp_path}", f"run.name=guard_{on}", "train.max_steps=12", f"train.nan_guard={on}"]
        assert run(load_config(CONFIGS / "cpu_smoke.yaml", args)) == 0
        finals.append(torch.load(tmp_path / f"guard_{on}" / "checkpoints" / "step_00000012.pt", weights_only=True)["model"])
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
