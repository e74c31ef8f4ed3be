"""Checkpoint files: manifests, keep_last, fallback, and a real failed write (RLIMIT_FSIZE, the kernel's
'file too large', stands in for a full disk) that must leave earlier checkpoints intact."""
import subprocess
import sys

import pytest
import torch

from ddp_train.errors import CheckpointError
from ddp_train.rundir import checkpoints as ckpt

ENGINE_KEYS = {"format", "model", "optimizer", "config", "extra", "per_rank", "progress", "scheduler", "scaler"}


def state(step):
    return {"format": ckpt.FORMAT_VERSION, "model": {"w": torch.full((4,), float(step))}, "optimizer": {},
            "scheduler": {}, "scaler": {}, "progress": {"step": step}, "per_rank": [], "config": {},
            "extra": {"step": step}}


def test_keep_last_and_orphans(tmp_path):
    for step in (1, 2, 3, 4, 5):
        ckpt.write_checkpoint(tmp_path, step, state(step))
        ckpt.prune(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000005.pt", "step_00000004.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["step_00000004.json", "step_00000005.json"]
    (tmp_path / "step_00000003.pt").write_bytes(b"half-written, no manifest")
    (tmp_path / "step_00000004.pt.tmp").write_bytes(b"x")
    ckpt.prune(tmp_path, keep_last=2)
    assert not (tmp_path / "step_00000003.pt").exists() and not list(tmp_path.glob("*.tmp"))


def test_newest_valid_skips_damaged_and_names_it(tmp_path, caplog):
    for step in (1, 2):
        ckpt.write_checkpoint(tmp_path, step, state(step))
    newest = tmp_path / "step_00000002.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    assert ckpt.newest_valid(tmp_path) == tmp_path / "step_00000001.pt"
    assert "step_00000002.pt is unusable (size" in caplog.text
    assert ckpt.read_checkpoint(tmp_path / "step_00000001.pt")["progress"]["step"] == 1


def test_unexpected_layout_names_the_keys(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"model": {}, "bogus": 1}, p)
    with pytest.raises(CheckpointError, match=r"missing keys \[.*'optimizer'.*\], unexpected keys \['bogus'\]"):
        ckpt.read_checkpoint(p, expected=ENGINE_KEYS)


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path):
    code = f"""
import resource, signal, torch, sys
from pathlib import Path
from ddp_train.rundir import checkpoints as ckpt
d = Path({str(tmp_path)!r})
ckpt.write_checkpoint(d, 1, {{"model": {{"w": torch.zeros(10)}}}})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG as an OSError instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    ckpt.write_checkpoint(d, 2, {{"model": {{"w": torch.zeros(100000)}}}})
except OSError as e:
    print("OSError", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "OSError writing" in out.stdout and "step_00000002.pt failed" in out.stdout, out.stderr
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob("*.tmp"))
    assert not (tmp_path / "step_00000002.pt").exists() and not (tmp_path / "step_00000002.json").exists()
    assert ckpt.verify(tmp_path / "step_00000001.pt") is None
    assert ckpt.newest_valid(tmp_path) == tmp_path / "step_00000001.pt"


def test_prune_keeps_fsdp_shard_directories_exactly_as_long_as_their_checkpoint(tmp_path):
    for step in (10, 20, 30):
        (tmp_path / f"step_{step:08d}.pt").write_bytes(b"x")
        (tmp_path / f"step_{step:08d}.json").write_text("{}")
        (tmp_path / f"step_{step:08d}.dcp").mkdir()
        (tmp_path / f"step_{step:08d}.dcp" / "__0_0.distcp").write_bytes(b"x")
    (tmp_path / "step_00000040.dcp.tmp").mkdir()  # a sharded save that never finished
    ckpt.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000020.dcp", "step_00000020.json", "step_00000020.pt",
        "step_00000030.dcp", "step_00000030.json", "step_00000030.pt"]


def test_a_resumed_run_keeps_no_checkpoint_file_mapped_after_pruning(tmp_path, monkeypatch):
    """Resume used to mmap the checkpoint, and optimizer.load_state_dict keeps CPU tensors as they are, so
    a pruned file stayed mapped (on NFS: .nfsXXXX files nobody can delete). The step-10 checkpoint is
    rewritten with an index-keyed optimizer state (what optimizer.state_dict() gives and older ddp_train
    wrote), the path that loads through optimizer.load_state_dict. In-process, world size 1."""
    import os

    from conftest import CONFIGS

    from ddp_train.config import load_config
    from ddp_train.engine.run import run

    args = [f"run.root={tmp_path}", "run.name=r", "checkpoint.every_steps=5", "checkpoint.keep_last=1",
            "train.max_steps=20", "optim.name=adam"]
    assert run(load_config(CONFIGS / "cpu_smoke.yaml", args + ["checkpoint.simulate_preempt_at_step=10"])) == 75
    resumed_from = tmp_path / "r" / "checkpoints" / "step_00000010.pt"
    state = torch.load(resumed_from, weights_only=True)
    names = [n for g in state["optimizer"]["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(names)}
    state["optimizer"] = {"state": {index[n]: v for n, v in state["optimizer"]["state"].items()},
                          "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                           for g in state["optimizer"]["param_groups"]]}
    ckpt.write_checkpoint(resumed_from.parent, 10, state)
    still_mapped = []
    prune = ckpt.prune

    def prune_and_look(*args):  # while the run goes on, right after each prune
        prune(*args)
        maps = open(f"/proc/{os.getpid()}/maps").read()
        still_mapped.extend(line.split()[-2] for line in maps.splitlines() if "(deleted)" in line and ".pt" in line)

    monkeypatch.setattr(ckpt, "prune", prune_and_look)
    assert run(load_config(CONFIGS / "cpu_smoke.yaml", args)) == 0
    assert not resumed_from.exists()  # pruned by keep_last=1
    assert still_mapped == []


def test_name_keyed_optimizer_state_equals_torch_dcp_and_round_trips():
    """A plain module's optimizer state is keyed by name without importing torch.distributed.checkpoint
    (1.1 s of start-up): the same dict DCP's full state dict gives, and it loads back exactly."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from ddp_train.engine.model_state import load_named_optimizer_state, named_optimizer_state

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.1}])
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    ours = named_optimizer_state(model, opt)
    theirs = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for name, state in ours["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(theirs["state"][name][k])) for k, v in state.items())
    fresh = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.1}])
    load_named_optimizer_state(model, fresh, ours)
    assert fresh.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert all(torch.equal(fresh.state_dict()["state"][i]["exp_avg"], opt.state_dict()["state"][i]["exp_avg"])
               for i in range(4))
