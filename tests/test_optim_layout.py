"""Optimizer state follows its parameter's memory layout after a load (engine/optim_layout.py): a resume in
another layout (NCHW <-> channels_last, FSDP -> DDP) must step exactly as the uninterrupted run."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from ddp_train.config import OptimConfig
from ddp_train.engine.model_state import consolidated, load_consolidated
from ddp_train.engine.optim import build_optimizer
from ddp_train.engine.optim_layout import LayoutMismatch, mismatches

CL = torch.channels_last


def _net(layout=torch.contiguous_format) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 10))
    return net.to(memory_format=layout)


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 3, 12, 12, generator=g), torch.randint(0, 10, (6,), generator=g)
    nn.functional.cross_entropy(model(x.contiguous(memory_format=CL) if _is_cl(model) else x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _is_cl(model: nn.Module) -> bool:
    w = model[0].weight
    return w.is_contiguous(memory_format=CL) and not w.is_contiguous()


def _trained(name: str, layout, steps: int = 3):
    model = _net(layout)
    opt = build_optimizer(OptimConfig(name=name, lr=1e-3, implementation="for_loop"), model)
    for s in range(steps):
        _step(model, opt, s)
    return model, opt


def test_torch_itself_keeps_the_saved_strides_and_its_fused_adam_then_steps_wrong():
    """Pins torch's behaviour that engine/optim_layout.py works around. When a torch release restores state
    in the parameter's layout, this says so (a warning in the test summary): the relayout is then a no-op."""
    torch.manual_seed(0)
    p = torch.randn(8, 4, 3, 3).contiguous(memory_format=CL)
    grad = torch.randn_like(p)
    saved = {"step": torch.tensor(5.0), "exp_avg": torch.randn(8, 4, 3, 3), "exp_avg_sq": torch.rand(8, 4, 3, 3)}
    after = {}
    for kernels in ({"fused": True}, {"foreach": False}):
        q = nn.Parameter(p.clone())
        opt = torch.optim.Adam([q], lr=1e-3, **kernels)  # torch's own optimizer, without ddp_train's hooks
        opt.load_state_dict({"state": {0: {k: v.clone() for k, v in saved.items()}},
                             "param_groups": opt.state_dict()["param_groups"]})
        kept = opt.state[q]["exp_avg"].stride() == saved["exp_avg"].stride()
        q.grad = grad.clone()
        opt.step()
        after["fused" if "fused" in kernels else "loop"] = q.detach().clone()
    error = (after["fused"] - after["loop"]).abs().max().item()
    if not kept:
        warnings.warn(f"torch {torch.__version__} now loads optimizer state in the parameter's layout: "
                      "ddp_train's relayout (engine/optim_layout.py) has nothing left to do", stacklevel=1)
        assert error < 1e-6
    else:
        assert error > 1e-4, f"fused Adam on mismatched layouts now steps right (error {error:.1e})"


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("saved_in, loaded_in", [(torch.contiguous_format, CL), (CL, torch.contiguous_format)])
def test_a_resume_in_the_other_layout_steps_exactly_like_the_uninterrupted_run(name, saved_in, loaded_in):
    saved_model, saved_opt = _trained(name, saved_in)
    saved = copy.deepcopy(consolidated(saved_model, saved_opt))
    results = {}
    for impl in ("fused", "foreach", "for_loop"):
        model = _net(loaded_in)
        opt = build_optimizer(OptimConfig(name=name, lr=1e-3, implementation=impl), model)
        load_consolidated(model, opt, *copy.deepcopy(saved))  # as read from a file: no tensor shared
        assert mismatches(opt) == []
        for p in model.parameters():
            for v in opt.state[p].values():
                if v.dim():
                    assert v.stride() == p.stride() and torch.equal(v, saved_opt.state[_twin(p, model, saved_model)][
                        next(k for k, w in opt.state[p].items() if w is v)])
        for s in range(3, 6):
            _step(model, opt, s)
        results[impl] = [p.detach().clone() for p in model.parameters()]
    for s in range(3, 6):  # the uninterrupted run, in its own layout
        _step(saved_model, saved_opt, s)
    for impl, params in results.items():
        for a, b in zip(params, saved_model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-7, msg=lambda m, impl=impl: f"{impl}: {m}")


def _twin(p: nn.Parameter, model: nn.Module, other: nn.Module) -> nn.Parameter:
    name = next(n for n, q in model.named_parameters() if q is p)
    return dict(other.named_parameters())[name]


def test_a_step_on_state_out_of_layout_is_refused_naming_the_tensor():
    saved_model, saved_opt = _trained("adam", torch.contiguous_format)
    model_sd, optim_sd = consolidated(saved_model, saved_opt)
    model = _net(CL)
    opt = build_optimizer(OptimConfig(name="adam", lr=1e-3, implementation="fused"), model)
    load_consolidated(model, opt, model_sd, optim_sd)
    weight = model[0].weight
    opt.state[weight]["exp_avg"] = opt.state[weight]["exp_avg"].contiguous()  # as a path around the hook would
    with pytest.raises(LayoutMismatch, match=r"group 0 param 0 exp_avg: strides \(27, 9, 3, 1\)"):
        _step(model, opt, 0)
