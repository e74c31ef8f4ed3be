"""Shared helpers: run the engine as users do (python -m / real torchrun subprocesses) and read what it
leaves in the run directory."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ddp_train.config.argv import engine_command

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SLURM_SCRIPTS = ROOT / "tests" / "slurm"  # start-cluster.sh / stop-cluster.sh


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
    cmd = engine_command(args, nproc, master_port=free_port(), torchrun_args=list(torchrun_args))
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


# --------------------------------------------------------------------------------------------- SLURM
# A real single-node SLURM cluster on localhost (munged, slurmctld, slurmd, slurmdbd + MariaDB for sacct),
# started once per session by tests/slurm/start-cluster.sh with all state under a pytest temp dir. As root
# with apt-get (CI) the script first installs the Debian packages (~20 s); elsewhere, without them, the
# SLURM tests skip and say why.
@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    root_with_apt = os.geteuid() == 0 and shutil.which("apt-get")
    if not root_with_apt and shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed and this is not root with apt-get to install it")
    base = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, SLURM_INSTALL="1" if root_with_apt else "0", SLURM_ACCOUNTING="1",
               SLURM_CTLD_PORT=str(free_port()), SLURMD_PORT=str(free_port()),
               SLURMDBD_PORT=str(free_port()), SLURM_DB_PORT=str(free_port()))
    proc = subprocess.run([str(SLURM_SCRIPTS / "start-cluster.sh"), str(base)], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == 2:
        pytest.skip(f"SLURM not available: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, f"SLURM cluster failed to start:\n{proc.stderr[-3000:]}"
    try:
        yield base / "etc" / "slurm.conf"
    finally:
        subprocess.run([str(SLURM_SCRIPTS / "stop-cluster.sh"), str(base)], env=env, capture_output=True, timeout=120)


@pytest.fixture
def slurm_env(slurm_cluster) -> dict[str, str]:
    """The submitting shell: the project importable, SLURM_CONF set, W&B off unless a test turns it on.
    sbatch exports this environment into the job."""
    return engine_env(SLURM_CONF=str(slurm_cluster))


def launcher(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.slurm", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def slurm(cmd: list[str], env: dict[str, str]) -> str:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
