"""Shared helpers: run the engine as users do (python -m / real torchrun subprocesses) and read what it
leaves in the run directory."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in list(env):  # a test must not inherit a surrounding launcher's rank variables
        if key.startswith(("SLURM_", "TORCHELASTIC_", "WANDB_")) or key in (
                "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def run_engine(args: list[str], nproc: int = 1, cwd: Path | None = None, timeout: float = 300,
               env: dict[str, str] | None = None, torchrun_args: list[str] = ()) -> subprocess.CompletedProcess:
    """nproc=1 -> `python -m ddp_train`; nproc>1 -> `torchrun --nproc_per_node=nproc -m ddp_train`."""
    if nproc == 1 and not torchrun_args:
        cmd = [sys.executable, "-m", "ddp_train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *torchrun_args, "-m", "ddp_train", *args]
    return subprocess.run(cmd, cwd=cwd, env=env or engine_env(), capture_output=True, text=True,
                          timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]


def final_checkpoint(run_dir: Path) -> dict:
    import torch

    ckpts = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    assert ckpts, f"no checkpoint in {run_dir}: {list(run_dir.rglob('*'))}"
    return torch.load(ckpts[-1], map_location="cpu", weights_only=True)


def max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def check(proc: subprocess.CompletedProcess, rc: int = 0) -> subprocess.CompletedProcess:
    assert proc.returncode == rc, f"exit {proc.returncode} (wanted {rc})\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    return tmp_path / "runs"
