"""parallel.strategy=fsdp (FSDP2 fully_shard) on CPU/gloo with real torchrun: the same weights as DDP in
fp32 (with gradient accumulation, so set_requires_gradient_sync is exercised), an exact resume from the
sharded torch.distributed.checkpoint files, and DDP <-> FSDP resumes through the consolidated file."""
from __future__ import annotations

import shutil

import pytest
from conftest import CONFIGS, check, final_checkpoint, max_param_diff, run_engine

pytestmark = pytest.mark.slow

# SGD+momentum: Adam divides by sqrt(v) and magnifies last-bit differences in reduction order.
BASE = [str(CONFIGS / "cpu_smoke.yaml"), "optim.name=sgd", "optim.lr=0.05", "train.grad_accum_steps=2",
        "checkpoint.every_steps=10", "checkpoint.keep_last=2"]
FSDP = "parallel.strategy=fsdp"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """ddp and fsdp: 20 steps each, checkpoints at 10 and 20. The others resume copies of their step-10
    checkpoints (as after a preemption there) under the same or the other strategy."""
    root = tmp_path_factory.mktemp("fsdp")
    logs = {}

    def train(name, *extra):
        proc = check(run_engine([*BASE, f"run.root={root}", f"run.name={name}", *extra], nproc=2))
        logs[name] = proc.stdout + proc.stderr

    def from_step_10(source, name):
        shutil.copytree(root / source, root / name)
        for path in (root / name / "checkpoints").glob("step_00000020*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    train("ddp")
    train("fsdp", FSDP)
    for source, name, strategy in (("fsdp", "fsdp_to_fsdp", FSDP), ("fsdp", "fsdp_to_ddp", "parallel.strategy=ddp"),
                                   ("ddp", "ddp_to_fsdp", FSDP)):
        from_step_10(source, name)
        train(name, strategy)
    return root, logs


def test_fsdp_reaches_the_same_weights_as_ddp(runs):
    root, _ = runs
    ddp, fsdp = final_checkpoint(root / "ddp"), final_checkpoint(root / "fsdp")
    assert fsdp["progress"]["step"] == 20
    assert fsdp["model"].keys() == ddp["model"].keys()  # the consolidated file: plain names, full tensors
    assert max_param_diff(ddp["model"], fsdp["model"]) < 1e-5
    assert fsdp["optimizer"]["state"].keys() == ddp["optimizer"]["state"].keys()  # keyed by parameter name
    assert (root / "fsdp" / "checkpoints" / "step_00000020.dcp" / ".metadata").is_file()
    assert not list((root / "ddp" / "checkpoints").glob("*.dcp"))


def test_fsdp_resumes_exactly_from_its_sharded_checkpoint(runs):
    root, logs = runs
    assert "(sharded: step_00000010.dcp) at step 10" in logs["fsdp_to_fsdp"]
    ref, got = final_checkpoint(root / "fsdp"), final_checkpoint(root / "fsdp_to_fsdp")
    assert got["progress"]["step"] == 20
    assert max_param_diff(ref["model"], got["model"]) == 0.0


@pytest.mark.parametrize("name, reference", [("ddp_to_fsdp", "fsdp"), ("fsdp_to_ddp", "ddp")])
def test_checkpoints_resume_across_ddp_and_fsdp(runs, name, reference):
    root, logs = runs
    assert "resumed from" in logs[name] and "sharded" not in logs[name]  # through the consolidated file
    ref, got = final_checkpoint(root / reference), final_checkpoint(root / name)
    assert got["progress"]["step"] == 20
    assert max_param_diff(ref["model"], got["model"]) < 1e-5
