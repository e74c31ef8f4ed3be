"""Shared helpers: run the engine as users do (python -m / real torchrun subprocesses) and read what it
leaves in the run directory."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
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


def skewed_rank_env(tmp_path: Path, rank: int, seconds: float, at: str) -> dict[str, str]:
    """engine_env with one rank `seconds` late, as a slow node makes it: at="start" before anything
    of ours runs, at="exit" after the run returned (an atexit handler). A sitecustomize on PYTHONPATH,
    so real torchrun workers race as they do on a loaded machine, in the worst order, every time."""
    hook = tmp_path / f"skew_rank{rank}_{at}"
    hook.mkdir(parents=True, exist_ok=True)
    delay = f"time.sleep({seconds})" if at == "start" else f"atexit.register(time.sleep, {seconds})"
    (hook / "sitecustomize.py").write_text(
        f"import atexit, os, time\nif os.environ.get('RANK') == '{rank}':\n    {delay}\n")
    env = engine_env()
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
    return env


def worker_exit_codes(stderr: str) -> list[int]:
    """torchrun's failure summary: every failed worker's exit code, one per worker (the `exitcode  : N`
    rows, not the agent's log lines; the agent itself exits 1)."""
    return [int(c) for c in re.findall(r"^\s*exitcode\s+:\s*(-?\d+)", stderr, re.MULTILINE)]


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


# One config for every comparison across launchers, nodes and world sizes: no augmentation, no dropout, plain
# SGD, a global batch that divides by 1, 2 and 3 ranks, so those runs differ by fp32 reduction order at most.
# A gentle learning rate: at lr=0.05 the loss spikes early and amplifies that last-bit noise (2 vs 3 ranks:
# 2e-7 at step 20, 8% at step 60, measured); at 0.01 they stay within 5e-7 for all 120 steps. 2 epochs of
# 83 steps capped at 120 (~0.05 s a step here): long enough to be signalled or killed mid-run, with a
# checkpoint every 20 steps to resume from.
MULTINODE = [str(CONFIGS / "cpu_smoke.yaml"), "model.name=cnn", "optim.name=sgd", "optim.lr=0.01",
             "train.global_batch_size=48", "train.epochs=2", "train.max_steps=120", "train.log_every_steps=10",
             "checkpoint.every_steps=20"]


@pytest.fixture(scope="session")
def local_pair_run(tmp_path_factory) -> Path:
    """MULTINODE on 2 local processes under one torchrun agent: what the multi-node runs are compared to."""
    root = tmp_path_factory.mktemp("local_pair")
    check(run_engine([*MULTINODE, f"run.root={root}", "run.name=pair"], nproc=2))
    return root / "pair"


def wait_for(what: str, condition, timeout: float, poll_s: float = 0.1):
    """condition()'s first truthy value within `timeout` seconds, else a failed assertion naming `what`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def max_step(run_dir: Path) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return -1
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step", -1))
        except ValueError:
            continue  # a line being written
    return max(steps, default=-1)


# --------------------------------------------------------------------------------------------- SLURM
# A real SLURM cluster on this one host: munged, slurmctld, slurmdbd + MariaDB (for sacct) and one slurmd per
# node (n1..n3, each on its own loopback address, with its own hostname in private UTS/mount namespaces, so
# MASTER_ADDR=n1 resolves on every node), started once per session by tests/slurm/start-cluster.sh with all
# state under a pytest temp dir. Single-node tests land on any node; multi-node tests use 2 or 3. As root with
# apt-get (CI) the script first installs the Debian packages (~20 s); elsewhere, without them or without
# root (several slurmd, namespaces), the SLURM tests skip and say why.
SLURM_NODES = 3


def free_port_block(n: int) -> int:
    """A port p with p .. p+n-1 all free (node i's slurmd listens on SLURMD_PORT+i-1)."""
    for _ in range(50):
        base = free_port()
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {n} free ports")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    root_with_apt = os.geteuid() == 0 and shutil.which("apt-get")
    if not root_with_apt and shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed and this is not root with apt-get to install it")
    base = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, SLURM_INSTALL="1" if root_with_apt else "0", SLURM_ACCOUNTING="1",
               SLURM_NUM_NODES=str(SLURM_NODES), SLURM_CTLD_PORT=str(free_port()),
               SLURMD_PORT=str(free_port_block(SLURM_NODES)), SLURMDBD_PORT=str(free_port()),
               SLURM_DB_PORT=str(free_port()))
    proc = subprocess.run([str(SLURM_SCRIPTS / "start-cluster.sh"), str(base)], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == 2:
        pytest.skip(f"SLURM not available: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, f"SLURM cluster failed to start:\n{proc.stderr[-3000:]}"
    try:
        yield base / "etc" / "slurm.conf"
    finally:
        subprocess.run([str(SLURM_SCRIPTS / "stop-cluster.sh"), str(base)], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def shared_dir():
    """Run roots for multi-node jobs: the launcher refuses node-local ones (/tmp, /dev/shm) for several nodes,
    as it must on a real cluster, so these live where a home directory would (every node sees it);
    DDP_TRAIN_TEST_SHARED_DIR moves them. Removed at the end of the session."""
    parent = Path(os.environ.get("DDP_TRAIN_TEST_SHARED_DIR") or Path.home() / ".cache" / "ddp_train-tests")
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="multinode-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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


# ----------------------------------------------------------------------------------- a user's project
# Written by the tests into a temp directory (never under ddp_train/): a model factory with kwargs, a
# dataset factory (map-style, random noise per sample, values in [0, 1]) and a custom loss.
USER_PROJECT = {
    "quads/__init__.py": "",
    "quads/nets.py": '''
from torch import nn

def small_cnn(num_classes, in_channels, image_size, width=8):
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(width * (image_size // 2) ** 2, num_classes))

def raising(num_classes, in_channels, image_size):
    raise ValueError("width must be even")

def not_a_module(num_classes, in_channels, image_size):
    return {"weights": 1}

class SlowFirstStep(nn.Module):
    """The first training forward on one rank takes `delay` s, like a slow first compile there."""
    def __init__(self, net, delay, slow_rank):
        super().__init__()
        import os
        self.net = net
        self.delay = delay if int(os.environ.get("RANK", "0")) == slow_rank else 0.0

    def forward(self, x):
        # not on the meta/fake copies the engine probes the model with (FLOPs, channels_last): a compile
        # is slow in the first real step
        if self.delay and self.training and x.device.type != "meta" and type(x).__name__ != "FakeTensor":
            import time
            time.sleep(self.delay)
            self.delay = 0.0
        return self.net(x)

def slow_first_step_cnn(num_classes, in_channels, image_size, width=6, delay=0.0, slow_rank=1):
    return SlowFirstStep(small_cnn(num_classes, in_channels, image_size, width), delay, slow_rank)

class Warns(nn.Module):
    """Warns in forward, on every rank (once per process: Python's default filter)."""
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        import warnings
        warnings.warn("quads: inputs look unnormalised", UserWarning)
        return self.net(x)

def warning_cnn(num_classes, in_channels, image_size, width=8):
    return Warns(small_cnn(num_classes, in_channels, image_size, width))
''',
    "quads/data.py": '''
import torch
from torch.utils.data import Dataset

class Quadrants(Dataset):
    """A bright 4x4 patch in one of four quadrants of a dark 12x12 image: the quadrant is the class."""
    classes = ["top-left", "top-right", "bottom-left", "bottom-right"]

    def __init__(self, n, seed, noise):
        self.labels = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(seed))
        self.noise = noise

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        c = int(self.labels[i])
        image = torch.zeros(1, 12, 12)
        r, k = (c // 2) * 6 + 1, (c % 2) * 6 + 1
        image[:, r:r + 4, k:k + 4] = 1.0
        image = (image + self.noise * torch.randn(1, 12, 12)).clamp(0, 1)  # keyed per sample by ddp_train
        return image, c

def quadrants(root, n_train=512, n_test=200, noise=0.3):
    return Quadrants(n_train, 0, noise), Quadrants(n_test, 1, noise)

_slept = []

def slow_quadrants(root, delay=0.0, **kwargs):
    """Slow the first time in each process: rank 0 preparing alone, then every rank opening."""
    if not _slept:
        import time
        time.sleep(delay)
        _slept.append(delay)
    return quadrants(root, **kwargs)

class RankSlow(Quadrants):
    """Every sample costs `delay_s` on one rank only: a slow node's input pipeline."""
    def __init__(self, n, seed, noise, delay_s, slow_rank):
        super().__init__(n, seed, noise)
        import os
        self.delay_s = delay_s if int(os.environ.get("RANK", "0")) == slow_rank else 0.0

    def __getitem__(self, i):
        if self.delay_s:
            import time
            time.sleep(self.delay_s)
        return super().__getitem__(i)

def rank_slow_quadrants(root, delay_s=0.002, slow_rank=1, n_train=512, n_test=200, noise=0.3):
    return RankSlow(n_train, 0, noise, delay_s, slow_rank), Quadrants(n_test, 1, noise)

class Bad(Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        return [0.0, 1.0], "label"

def bad_samples(root):
    return Bad(), Bad()
''',
    "quads/losses.py": '''
import torch.nn.functional as F

def smoothed(logits, targets):
    return F.cross_entropy(logits, targets, label_smoothing=0.05)

def per_sample(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none")
''',
    "broken.py": "import not_installed_package_xyz\n",
}
USER_ARGS = ["model.name=quads.nets:small_cnn", "model.kwargs.width=6", "data.name=quads.data:quadrants",
             "data.kwargs.n_train=512", "train.loss=quads.losses:smoothed", "optim.lr=0.01", "data.num_workers=1"]


def write_user_project(root: Path) -> Path:
    for rel, text in USER_PROJECT.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.lstrip("\n"))
    return root

def job_rows(stdout: str) -> list[tuple[str, Path]]:
    """The launcher's table: '  <job id>  <run dir>  [swept values]'."""
    return [(m[1], Path(m[2])) for m in re.finditer(r"^  (\d+(?:_\d+)?)  (\S+)", stdout, re.M)]


def only_run_dir(root: Path) -> Path:
    dirs = [d for d in root.iterdir() if (d / "config.yaml").exists()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def job_field(job_id: str, key: str, env: dict[str, str]) -> str:
    """One field of `scontrol show job` (Restarts, ExcNodeList, NodeList, JobState ...)."""
    m = re.search(rf"\b{key}=(\S*)", slurm(["scontrol", "show", "job", "-o", job_id], env))
    return m[1] if m else ""


class Launch:
    """`python -m launch.slurm ARGS --wait` in the background, its output collected as it comes, so a test can
    act on the job (signal it, kill a task) while the launcher follows it."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "launch.slurm", *args, "--wait"], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(pipe, lines), daemon=True)
                        for pipe, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.readers:
            t.start()

    @staticmethod
    def _read(pipe, lines: list[str]) -> None:
        for line in pipe:
            lines.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def rows(self, n: int = 1, timeout: float = 60) -> list[tuple[str, Path]]:
        def ready():
            rows = job_rows(self.stdout)
            if len(rows) >= n:
                return rows[:n]
            if self.proc.poll() is not None:
                time.sleep(0.5)  # the readers drain the pipes
                raise AssertionError(f"the launcher exited {self.proc.returncode} before submitting:\n{self!r}")
            return None
        return wait_for(f"{n} job(s) in the launcher's table", ready, timeout)

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            self.proc.kill()
            for t in self.readers:
                t.join(timeout=10)
        return rc

    def __repr__(self) -> str:  # what an assertion message shows
        return f"STDOUT:\n{self.stdout[-4000:]}\nSTDERR:\n{self.stderr[-4000:]}"


def worker_pids(agent_pid: int) -> dict[int, int]:
    """rank -> pid of the torchrun agent's worker processes."""
    out = {}
    for pid in map(int, subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout.split()):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((int(e.split(b"=")[1]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            out[rank] = pid
    return out
