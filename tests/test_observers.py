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
    assert ("behind: rank 1: no heartbeat in the store and no stacks file" in
            report({0: _rec(0, 3, "step"), 1: None}, 1.0, 10, _NoDir()))


def test_the_hang_report_says_what_it_knows_of_a_rank_whose_heartbeat_it_could_not_read(tmp_path):
    """The field report: "rank 1: never sent a heartbeat" for a rank that had heartbeated and dumped its
    stacks; the reporter's store had stopped answering. The stacks file says where the rank was; without one,
    the report says the record was unreadable, not that it was never sent."""
    (tmp_path / "rank1.txt").write_text("rank 1 on n2 (pid 4242): step 7, phase data\nThread 0x1 ...\n")
    text = report({0: _rec(0, 8, "step"), 1: None}, 1.0, 10, tmp_path, unread={1}, reporter=0)
    assert "never" not in text, text
    assert ("behind: rank 1 on n2 (pid 4242) at step 7, phase data: behind the others at step 7 (its heartbeat "
            "was not readable from the store; this is from the stacks it dumped, rank1.txt)") in text, text
    assert text.splitlines()[-1].split()[1:4] == ["n2", "4242", "7"] and text.endswith("rank1.txt\n")
    text = report({0: _rec(0, 8, "step"), 1: None, 2: None}, 1.0, 10, tmp_path, unread={1, 2}, reporter=0)
    assert "behind: rank 2: its heartbeat could not be read (the store stopped answering rank 0)" in text, text
    rows = {line.split()[0]: line for line in text.splitlines()[-3:]}
    assert "unread" in rows["2"] and "never" not in rows["2"]


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


def test_the_guard_changes_nothing_in_a_run_without_nans_and_reads_its_verdicts_at_log_steps(tmp_path, monkeypatch):
    """The verdict stays on the device (fused Adam's found_inf): guard on and off end on bitwise the same
    weights and EMA (fp32), and the host reads the guard's flags only where it reads the loss anyway (log
    steps every 5 of 20: 4 reads, each of 5 steps), not once a step."""
    import torch
    from conftest import CONFIGS

    from ddp_train.config import load_config
    from ddp_train.engine import nan_guard
    from ddp_train.engine.run import run

    reads = []
    original = nan_guard.DeferredVerdicts.read
    monkeypatch.setattr(nan_guard.DeferredVerdicts, "read", lambda self: reads.append(len(self)) or original(self))
    finals = []
    for on in ("true", "false"):
        args = [f"run.root={tmp_path}", f"run.name=guard_{on}", f"train.nan_guard={on}", "train.ema_decay=0.9"]
        assert run(load_config(CONFIGS / "cpu_smoke.yaml", args)) == 0
        finals.append(torch.load(tmp_path / f"guard_{on}" / "checkpoints" / "step_00000020.pt", weights_only=True))
        summary = json.loads((tmp_path / f"guard_{on}" / "summary.json").read_text())
        assert summary["nan_guard"] == ("device" if on == "true" else "off")
    assert reads == [5, 5, 5, 5]
    for part in ("model", "ema"):
        a, b = (f["model"] if part == "model" else f["modules"]["ema"] for f in finals)
        assert all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_a_step_flagged_on_the_device_is_as_if_it_never_ran(name):
    """A non-finite gradient norm skips the fused step on the device: weights, optimizer state (Adam's step
    count included) and the EMA end bitwise where a run that never took that step ends."""
    import torch

    from ddp_train.config import OptimConfig
    from ddp_train.engine.ema import EMA
    from ddp_train.engine.nan_guard import step_with_flag
    from ddp_train.engine.optim import build_optimizer

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(6, 4, generator=g) for _ in range(3)]
    finals = []
    for flagged in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 6, bias=False)
        opt = build_optimizer(OptimConfig(name=name, lr=0.1, implementation="fused"), model)
        ema = EMA(model, 0.5)
        for i, grad in enumerate(grads):
            bad = i == 1
            if bad and not flagged:
                continue  # the run that never took that step
            model.weight.grad = torch.full_like(grad, float("nan")) if bad else grad.clone()
            norm = torch.linalg.vector_norm(model.weight.grad)
            flag = step_with_flag(opt, lambda o: o.step(), norm)
            assert flag.item() == float(bad)
            ema.update(model, flag)
        finals.append((model.weight.detach().clone(), ema.module.weight.clone(),
                       {k: v.clone() for k, v in opt.state[model.weight].items()}))
    (w1, e1, s1), (w2, e2, s2) = finals
    assert torch.equal(w1, w2) and torch.equal(e1, e2)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
