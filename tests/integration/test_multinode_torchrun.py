"""Multi-node without SLURM: two torchrun agents (one per "node", here both on localhost) meet through the
c10d rendezvous, as `torchrun --nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT` on two machines
would. The result must be the 2-process single-agent run's."""
from __future__ import annotations

import json
import subprocess

import pytest
from conftest import MULTINODE, check, engine_env, final_checkpoint, free_port, max_param_diff, train_losses

from ddp_train.config.argv import engine_command

pytestmark = pytest.mark.slow


def test_two_torchrun_agents_with_c10d_rendezvous_equal_one_agent_with_two_processes(local_pair_run, tmp_path):
    root = tmp_path / "runs"
    endpoint = f"127.0.0.1:{free_port()}"
    args = [*MULTINODE, f"run.root={root}", "run.name=agents"]
    agents = [subprocess.Popen(engine_command(args, 1, nnodes=2, rdzv_endpoint=endpoint,
                                              torchrun_args=["--rdzv-id=two-agents"]),
                               env=engine_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    try:
        done = [a.communicate(timeout=240) for a in agents]
    finally:
        for a in agents:
            a.kill()
    for agent, (out, err) in zip(agents, done):
        check(subprocess.CompletedProcess(agent.args, agent.returncode, out, err))
    run_dir = root / "agents"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["step"]) == (2, 120)
    assert "+".join(out + err for out, err in done).count("done: val/top1") == 1  # one rank 0, one run
    # Same world size, same gloo sums, one thread per process in both: bit for bit.
    assert dict(train_losses(run_dir)) == dict(train_losses(local_pair_run))
    assert max_param_diff(final_checkpoint(run_dir)["model"], final_checkpoint(local_pair_run)["model"]) == 0.0
