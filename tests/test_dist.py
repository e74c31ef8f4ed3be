"""Who-am-I rules (env.py) and the checks dist.py makes before a process group: local rank derivation,
SLURM host lists, the loopback check for multi-node gloo, torchrun's kill deadline, worker counts and
backend flags."""
from __future__ import annotations

import pytest
import torch

from ddp_train import dist, env
from ddp_train.data import worker_count
from ddp_train.engine.precision import configure_backends
from ddp_train.errors import UserError


def test_local_rank_is_derived_or_refused_never_every_rank_on_gpu_0():
    base = {"RANK": "5", "WORLD_SIZE": "8"}
    assert env.from_env({**base, "LOCAL_RANK": "1"}).local_rank == 1
    assert env.from_env({**base, "LOCAL_WORLD_SIZE": "4"}).local_rank == 1  # ranks fill nodes in order
    assert env.from_env({**base, "SLURM_LOCALID": "3"}).local_rank == 3
    assert env.from_env({"RANK": "0", "WORLD_SIZE": "1"}).local_rank == 0
    with pytest.raises(UserError, match="LOCAL_RANK is not: set LOCAL_RANK"):
        env.from_env(base)


@pytest.mark.parametrize("nodelist, hosts", [
    ("vm", ["vm"]),
    ("gpu[07-08],cpu1", ["gpu07", "gpu08", "cpu1"]),
    ("n[1,3-4]", ["n1", "n3", "n4"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("a[9-10]b,c", ["a9b", "a10b", "c"]),
])
def test_slurm_host_lists_expand_like_scontrol(nodelist, hosts):
    assert env.expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-", "gpu[a-b]", "gpu[]"])
def test_an_unreadable_host_list_is_refused_naming_it(bad):
    with pytest.raises(UserError, match="cannot read the SLURM node list .*set MASTER_ADDR"):
        env.expand_hostlist(bad)


def test_first_host_without_scontrol_uses_the_parser(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert env.first_host("rack[1-2]-n[01-04]") == "rack1-n01"


def test_ranks_per_host_reads_as_one_line_per_job():
    assert dist.ranks_by_host(["n1", "n2"]) == "n1: rank 0 | n2: rank 1"
    assert dist.ranks_by_host(["a"] * 4 + ["b"] * 4) == "a: ranks 0-3 | b: ranks 4-7"
    assert dist.ranks_by_host(["a", "b", "a", "b"]) == "a: ranks 0,2 | b: ranks 1,3"  # a round-robin placement
    assert dist.hosts_per_rank() == [__import__("socket").gethostname()]  # one process: no group, no collective


def test_gloo_on_a_hostname_that_resolves_to_loopback_is_caught_for_multi_node_jobs():
    problem = dist.loopback_problem("box", "127.0.1.1", "10.0.0.5", "10.0.0.5")
    assert "resolves to 127.0.1.1 (loopback)" in problem and "GLOO_SOCKET_IFNAME" in problem
    assert dist.loopback_problem("box", "10.0.0.7", "10.0.0.5", "10.0.0.5") is None
    # every node on loopback (one machine, e.g. the test cluster's n1/n2 on 127.0.10.x): nothing to fix
    assert dist.loopback_problem("n2", "127.0.10.2", "n1", "127.0.10.1") is None


def test_a_single_node_job_is_never_refused_for_loopback():
    dist.check_gloo_address(env.DistEnv(rank=0, world_size=2, local_world_size=2, master_addr="10.255.255.1"))


def test_torchruns_kill_deadline_is_read_from_its_environment(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert env.agent_shutdown_timeout() is None  # not under torchrun
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    for key in ("PET_SHUTDOWN_TIMEOUT", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    from torch.distributed.launcher.api import LaunchConfig

    configurable = "shutdown_timeout" in LaunchConfig.__dataclass_fields__
    assert env.agent_shutdown_timeout() == 30.0
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "77")
    assert env.agent_shutdown_timeout() == (77.0 if configurable else 30.0)


def test_auto_workers_share_the_cpus_among_the_ranks_of_a_node(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)))
    assert worker_count("auto", 8) == 3  # 4 CPUs per rank: 3 workers + the training process
    assert worker_count("auto", 1) == 8  # capped
    assert worker_count("auto", 64) == 1
    assert worker_count(0, 8) == 0  # an explicit number is kept


def test_gpu_numerics_defaults_and_deterministic_mode():
    before = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(),
              torch.backends.cudnn.allow_tf32, torch.are_deterministic_algorithms_enabled())
    try:
        configure_backends(deterministic=False, cudnn_benchmark=True, tf32=True)
        assert torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "high"
        configure_backends(deterministic=True, cudnn_benchmark=True, tf32=True)
        assert not torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "highest"
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.benchmark, precision, torch.backends.cudnn.allow_tf32, det = before
        torch.set_float32_matmul_precision(precision)
        torch.use_deterministic_algorithms(det)
