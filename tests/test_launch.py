"""The SLURM launcher's pieces that need no cluster: sweep expansion, preflight, triage wording, the
environment a SLURM task derives its rank/world/master from, and --dry-run's sbatch script."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import CONFIGS, ROOT, engine_env

from ddp_train.config import load_config
from ddp_train.env import cuda_index, from_env
from ddp_train.errors import UserError
from launch import faults, follow, preflight, sweep

SMOKE = str(CONFIGS / "cpu_smoke.yaml")


def test_sweep_is_the_cartesian_product_and_keeps_list_values_whole():
    assert sweep.expand([]) == [[]]
    assert sweep.expand(["optim.lr=1e-3,3e-4", "train.global_batch_size=64,128"]) == [
        ["optim.lr=1e-3", "train.global_batch_size=64"], ["optim.lr=1e-3", "train.global_batch_size=128"],
        ["optim.lr=3e-4", "train.global_batch_size=64"], ["optim.lr=3e-4", "train.global_batch_size=128"]]
    assert sweep.expand(["log.wandb.tags=[a,b],[c]"]) == [["log.wandb.tags=[a,b]"], ["log.wandb.tags=[c]"]]
    for bad in (["optim.lr"], ["optim.lr=1e-3,"], ["optim.lr=1", "optim.lr=2"]):
        with pytest.raises(UserError, match="--sweep"):
            sweep.expand(bad)


def request(**kw) -> preflight.Request:
    base = dict(nodes=1, gpus_per_node=0, tasks_per_node=None, time_min=60, signal_delay_s=120, max_requeues=3,
                partition=None, dry_run=True)
    return preflight.Request(**{**base, **kw})


def test_preflight_request_rules():
    assert request(gpus_per_node=8, nodes=2).world_size == 16  # one task per GPU
    assert request(tasks_per_node=4).world_size == 4  # CPU processes
    for kw, message in [({"gpus_per_node": 8, "tasks_per_node": 4}, "--tasks-per-node 4 != --gpus-per-node 8"),
                        ({"time_min": 0}, "--time 0"), ({"signal_delay_s": 3600}, "--signal-delay 3600s"),
                        ({"max_requeues": -1}, "--max-requeues -1"), ({"nodes": 0}, "--nodes 0")]:
        with pytest.raises(UserError, match=message):
            preflight.check_request(request(**kw))


def test_a_node_range_is_checked_for_every_node_count_it_can_start_with():
    assert preflight.node_range("2-4") == (2, 4) and preflight.node_range("3") == (3, None)
    req = request(nodes=2, max_nodes=4, tasks_per_node=2)
    assert (req.node_counts, req.nodes_spec, req.world_size) == ([2, 3, 4], "2-4", 8)
    preflight.check_config(load_config(SMOKE, ["train.global_batch_size=48"]), req)  # 4, 6 and 8 ranks
    with pytest.raises(UserError, match=r"does not divide by world size 6 .* --nodes 3 x 2 tasks per node; "
                                        r"--nodes 2-4 may start on any of 2-4 nodes: .* a multiple of 24 fits"):
        preflight.check_config(load_config(SMOKE, ["train.global_batch_size=32"]), req)
    for bad, message in [("2-x", "--nodes 2-x: write a node count"), ("4-2", "--nodes 4-2: the range must not")]:
        with pytest.raises(UserError, match=message):
            lo, hi = preflight.node_range(bad)
            preflight.check_request(request(nodes=lo, max_nodes=hi))


def test_a_node_is_at_fault_for_a_signal_or_lost_connections_not_for_a_bug_or_a_cancel():
    srun = "srun: error: n2: task 1: {}\nsrun: error: n1: task 0: Terminated\n"
    killed = {0: srun.format("Killed"), 1: ""}
    failure = faults.failing_task(killed)
    assert failure == faults.Failure(1, "Killed", "n2") and faults.exit_code_of(failure.words, 0) == 137
    assert faults.node_at_fault(failure, killed, {}) == ("n2", "rank 1 on n2: Killed (signal 9)")
    for words in ("Bus error", "Out Of Memory"):
        logs = {0: srun.format(words), 1: ""}
        assert faults.node_at_fault(faults.failing_task(logs), logs, {})[0] == "n2"
    for words in ("Terminated", "Exited with exit code 1", "Exited with exit code 2"):  # scancel, a bug, a config
        logs = {0: srun.format(words), 1: "Traceback (most recent call last):\nValueError: bug\n"}
        assert faults.node_at_fault(faults.failing_task(logs), logs, {}) is None
    addresses = faults.parse_node_addresses(
        "NodeName=n1 Arch=x86_64 NodeAddr=10.0.0.1 NodeHostName=gpu1 Version=22.05\n"
        "NodeName=n2 Arch=x86_64 NodeAddr=10.0.0.2 NodeHostName=gpu2 Version=22.05\n")
    assert addresses == {"n1": "n1", "10.0.0.1": "n1", "gpu1": "n1", "n2": "n2", "10.0.0.2": "n2", "gpu2": "n2"}
    gloo = {0: "Traceback (most recent call last):\nRuntimeError: [gloo/transport/tcp/pair.cc:534] Connection "
               "closed by peer [10.0.0.2]:4242\nsrun: error: n1: task 0: Exited with exit code 1\n", 1: ""}
    assert faults.node_at_fault(faults.failing_task(gloo), gloo, addresses) == (
        "n2", "rank 0 on n1 lost its connection to n2")
    nccl = {0: "gpu1:123:456 [0] NCCL WARN Net : Connection closed by remote peer gpu2<43120>\n"
               "srun: error: n1: task 0: Exited with exit code 1\n"}  # the line also names its own host
    assert faults.node_at_fault(faults.failing_task(nccl), nccl, addresses)[0] == "n2"


def test_a_node_range_asks_srun_for_the_tasks_per_node(shared_dir):
    """With --ntasks-per-node in the job, SLURM pins a node range to its lower end: the job asks for one task per
    node with the CPUs of all of them, srun splits each node."""
    proc = subprocess.run([sys.executable, "-m", "launch.slurm", SMOKE, f"run.root={shared_dir}/dry",
                           "train.global_batch_size=48", "--nodes", "2-4", "--tasks-per-node", "2",
                           "--cpus-per-task", "3", "--exclude", "n7", "--dry-run"], cwd=ROOT,
                          env=engine_env(PATH="/usr/bin:/bin"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=2-4" in proc.stdout and "#SBATCH --cpus-per-task=6" in proc.stdout
    assert "#SBATCH --exclude=n7" in proc.stdout and "--ntasks-per-node" not in proc.stdout.split("# command")[0]
    assert "--kill-on-bad-exit=1 --ntasks-per-node=2 --cpus-per-task=3" in proc.stdout
    assert '-m launch.teardown "$?"' in proc.stdout.split("# teardown")[1]  # after srun: node-fault requeues


def test_preflight_signal_delay_must_cover_the_last_measured_save_plus_a_step(tmp_path):
    assert preflight.check_signal_delay(request(signal_delay_s=5), tmp_path, None) is None  # nothing measured
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text(json.dumps(
        {"checkpoint_save_s": 30.0, "checkpoint_save_max_s": 35.0, "step_time_s": 5.0}))
    with pytest.raises(UserError, match="last checkpoint save took 35 s plus a step of 5.0 s.*--signal-delay 110"):
        preflight.check_signal_delay(request(signal_delay_s=40), tmp_path, None)  # the save cannot finish
    warning = preflight.check_signal_delay(request(signal_delay_s=60), tmp_path, None)
    assert "leaves little margin" in warning and "--signal-delay 110" in warning
    assert preflight.check_signal_delay(request(signal_delay_s=90), tmp_path, None) is None


def test_preflight_refuses_a_node_local_run_root_for_multi_node_jobs(tmp_path):
    with pytest.raises(UserError, match="node-local"):
        preflight.check_run_root(tmp_path / "runs", request(nodes=2))
    preflight.check_run_root(tmp_path / "runs", request(nodes=1))
    assert (tmp_path / "runs").is_dir()


@pytest.mark.parametrize("status, words", [
    (follow.JobStatus("FAILED", 137, 0), "probably out of memory"),
    (follow.JobStatus("OUT_OF_MEMORY", 0, 0), "probably out of memory"),
    (follow.JobStatus("FAILED", 0, 9), "probably out of memory"),
    (follow.JobStatus("TIMEOUT", 0, 15), "--time limit"),
    (follow.JobStatus("CANCELLED", 0, 15), "cancelled"),
    (follow.JobStatus("FAILED", 75, 0), "--max-requeues"),
    (follow.JobStatus("FAILED", 2, 0), "configuration or input error"),
    (follow.JobStatus("FAILED", 1, 0), "Python exception"),
])
def test_exit_reasons_in_words(status, words):
    assert words in follow.explain(status)


def test_failing_rank_prefers_the_killed_rank_over_collateral_tracebacks():
    logs = {0: "Traceback ...\nRuntimeError: Connection closed by peer\n"
               "srun: error: vm: task 3: Killed\nsrun: error: vm: tasks 0-2: Exited with exit code 1\n",
            1: "Traceback ... gloo", 2: "", 3: ""}
    assert follow.failing_rank(logs) == (3, "Killed")
    logs = {0: "srun: error: vm: tasks 0-1: Exited with exit code 2\n", 1: "[rank 1] ddp_train: error: bad\n"}
    assert follow.failing_rank(logs) == (1, "Exited with exit code 2")
    assert follow.failing_rank({0: "", 1: ""}) == (0, None)
    # --kill-on-bad-exit: a config error every rank raised, printed by rank 0, but rank 1 exited first and
    # rank 0 was terminated by srun: rank 0 and the code 2 are what the user needs, not "Terminated" (15)
    logs = {0: "ddp_train: error: MNIST not found\nsrun: error: vm: task 1: Exited with exit code 2\n"
               "srun: launch/slurm: _step_signal: Terminating StepId=7.0\nsrun: error: vm: task 0: Terminated\n",
            1: ""}
    rank, words = follow.failing_rank(logs)
    assert (rank, words, follow.exit_code_of(words, 15)) == (0, "Exited with exit code 2", 2)


def test_rank_and_world_come_from_the_srun_step_not_the_batch_script():
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "41", "SLURM_JOB_NODELIST": "vm"}
    assert from_env(batch).world_size == 1  # `python -m ddp_train` in the batch script: one process, no wait
    step = {**batch, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
            "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]"}
    env = from_env(step)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size, env.launcher) == (3, 1, 4, 2, "slurm")
    assert env.master_addr == "gpu07" and env.master_port == from_env({**step, "SLURM_PROCID": "0"}).master_port
    torchrun = {**step, "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "TORCHELASTIC_RUN_ID": "x"}
    assert (from_env(torchrun).rank, from_env(torchrun).launcher) == (5, "torchrun")  # torchrun inside sbatch


def test_cuda_device_follows_the_local_rank_and_cuda_visible_devices():
    assert [cuda_index(r, 4) for r in range(4)] == [0, 1, 2, 3]  # all of the node's GPUs visible
    assert [cuda_index(r, 1) for r in range(4)] == [0, 0, 0, 0]  # SLURM bound one GPU to each task


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.slurm", SMOKE, f"run.root={tmp_path}/runs",
                           "--gpus-per-node", "4", "--partition", "gpu", "--time", "30", "--signal-delay", "90",
                           "--mem", "64G", "--account", "proj", "--qos", "high", "--constraint", "h100",
                           "--cpus-per-task", "8", "--dry-run"], cwd=ROOT, env=engine_env(PATH="/usr/bin:/bin"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --signal=USR2@90", "#SBATCH --mem=64G",
                 "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --constraint=h100", "#SBATCH --requeue",
                 "#SBATCH --cpus-per-task=8", "srun --unbuffered",
                 "--kill-on-bad-exit=1 --cpus-per-task=8"):  # srun of Slurm 22.05-23.02 needs it passed
        assert line in proc.stdout, line
    assert not (tmp_path / "runs" / "slurm_logs").exists()


def test_without_slurm_the_launcher_says_so_and_exits_2(tmp_path):
    no_slurm = tmp_path / "bin"  # a PATH with no sbatch/srun on it
    no_slurm.mkdir()
    proc = subprocess.run([sys.executable, "-m", "launch.slurm", SMOKE, f"run.root={tmp_path}/runs"], cwd=ROOT,
                          env=engine_env(PATH=str(no_slurm)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "launch.slurm: error: sbatch/srun not found: run this on a SLURM login node, or add --dry-run to only "
        "print the job script")
