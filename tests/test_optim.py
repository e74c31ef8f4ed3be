"""optim.implementation: which kernels the optimizer runs (fused by default where torch has them)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist
from torch import nn

from ddp_train.config import OptimConfig, load_config
from ddp_train.engine.model_state import consolidated, load_consolidated
from ddp_train.engine.optim import build_optimizer, implementation
from ddp_train.errors import ConfigError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))


def _train(name: str, impl: str, steps: int = 20) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _net()
    opt = build_optimizer(OptimConfig(name=name, lr=1e-2, weight_decay=0.01, implementation=impl), model)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_auto_runs_the_fused_kernels_and_trains_the_same_weights_as_the_for_loop(name):
    fused_model, fused_opt = _train(name, "auto")
    loop_model, loop_opt = _train(name, "for_loop")
    assert all(g["fused"] for g in fused_opt.param_groups)
    assert not any(g["fused"] for g in loop_opt.param_groups) and loop_opt.defaults["foreach"] is False
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the same update, up to rounding


def test_a_checkpoint_resumes_into_the_resuming_runs_own_kernels():
    """A checkpoint's param groups say fused=True; an FSDP run (DTensors: no fused kernel) or a run with
    another optim.implementation resuming from it keeps its own kernels, and trains on from its state."""
    saved_model, saved_opt = _train("adam", "fused", steps=5)
    model_sd, optim_sd = consolidated(saved_model, saved_opt)
    model = _net()
    opt = build_optimizer(OptimConfig(name="adam", lr=1e-2, weight_decay=0.01, implementation="for_loop"), model)
    load_consolidated(model, opt, model_sd, optim_sd)
    assert not any(g["fused"] for g in opt.param_groups) and all(g["foreach"] is False for g in opt.param_groups)
    assert all(torch.equal(opt.state[p]["exp_avg"], saved_opt.state[q]["exp_avg"])
               for p, q in zip(model.parameters(), saved_model.parameters()))
    assert all(opt.state[p]["step"].device.type == "cpu" for p in model.parameters())
    nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()  # the for-loop kernel takes the fused run's state


def test_the_forced_choices_reach_torch():
    assert implementation("fused", []) == {"fused": True}
    assert implementation("foreach", []) == {"foreach": True}
    assert implementation("for_loop", []) == {"foreach": False}
    assert implementation("auto", [torch.zeros(3, dtype=torch.int64)]) == {}  # no fused kernel for ints


def test_fsdps_sharded_parameters_keep_torchs_default(tmp_path):
    """A real DTensor (a one-process gloo group in this process), as FSDP2 gives the optimizer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
        assert implementation("auto", [sharded]) == {}
        assert implementation("auto", [nn.Parameter(torch.randn(4, 4))]) == {"fused": True}
    finally:
        tdist.destroy_process_group()


def test_an_unknown_implementation_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"optim\.implementation.*auto, fused, foreach, for_loop"):
        load_config(None, ["optim.implementation=fast"])
