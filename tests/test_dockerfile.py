"""No Docker engine runs here, so the Dockerfile is checked statically: a pinned official PyTorch CUDA
runtime base, every COPY source present in the repository, the default command, and a .dockerignore
that keeps run outputs and data out of the build context."""
from __future__ import annotations

import re

from conftest import ROOT


def instructions() -> list[tuple[str, str]]:
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    return [tuple(ln.split(None, 1)) for ln in lines if ln and not ln.startswith("#") and " " in ln]


def test_base_image_is_a_pinned_official_pytorch_cuda_runtime():
    [base] = [arg for op, arg in instructions() if op == "FROM"]
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", base), base


def test_copied_paths_exist_and_the_default_command_runs_the_engine_under_torchrun():
    for op, arg in instructions():
        if op == "COPY":
            *sources, _ = arg.split()
            for src in sources:
                assert (ROOT / src).exists(), src
    [cmd] = [arg for op, arg in instructions() if op == "CMD"]
    assert cmd == '["torchrun", "--nproc_per_node=gpu", "-m", "ddp_train"]'


def test_dockerignore_keeps_outputs_and_data_out_of_the_image():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {"runs", "data", "wandb", ".git", "*.pt"} <= ignored
