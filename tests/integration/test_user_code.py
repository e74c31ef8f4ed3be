"""Users' own model, dataset and loss by import path, from a project the test writes outside ddp_train/:
trained by real torchrun, then evaluate/export/predict/verify_resume on its run directory; a timm model;
and the one-line errors for every kind of bad user code."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import (
    CONFIGS,
    ROOT,
    USER_ARGS,
    check,
    engine_env,
    run_engine,
    write_user_project,
)

pytestmark = pytest.mark.slow
SMOKE = str(CONFIGS / "cpu_smoke.yaml")
TRAIN = [SMOKE, *USER_ARGS, "train.max_steps=null", "train.epochs=3", "train.log_every_steps=4"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The user's project, trained on 2 processes from its own directory."""
    root = write_user_project(tmp_path_factory.mktemp("user_project"))
    proc = check(run_engine([*TRAIN, f"run.root={root / 'runs'}", "run.name=quads"], nproc=2, cwd=root))
    return root, root / "runs" / "quads", proc


def tool(*args, cwd=ROOT, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=engine_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_a_user_model_dataset_and_loss_train_on_two_processes(project):
    _, run, proc = project
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["val/count"] == 200
    assert summary["val/top1"] >= 0.95, summary  # four quadrants: easy, but only if the pieces are wired right
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["model"]["name"], cfg["model"]["kwargs"], cfg["train"]["loss"]) == (
        "quads.nets:small_cnn", {"width": 6}, "quads.losses:smoothed")
    info = json.loads((run / "data_info.json").read_text())
    assert info["class_names"] == ["top-left", "top-right", "bottom-left", "bottom-right"]
    assert (info["in_channels"], info["image_size"]) == (1, [12, 12])
    assert "DataLoader" in proc.stdout  # map-style user data: the DataLoader path


def test_evaluate_from_another_directory_matches_the_runs_own_evaluation(project):
    root, run, _ = project
    proc = tool("ddp_train.evaluate", str(run))  # cwd is the repository: the modules come from data_info.json
    assert proc.returncode == 0, proc.stderr
    result = json.loads((run / "eval.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert result["top1"] == summary["val/top1"]  # the dataset's random noise is keyed: same draws
    assert result["loss"] == pytest.approx(summary["val/loss"], rel=1e-5)  # the user's loss, summed exactly


def test_export_and_predict_need_only_the_users_model_module(project):
    root, run, _ = project
    proc = tool("ddp_train.export", str(run), "--format", "onnx", "--dynamic-batch")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert float(proc.stdout.split("max |logit diff| = ")[1].split()[0]) <= 1e-4
    from PIL import Image

    image = torch.zeros(12, 12)
    image[7:11, 7:11] = 1.0  # bottom-right
    Image.fromarray((image.numpy() * 255).astype("uint8"), mode="L").save(root / "bottom_right.png")
    proc = tool("ddp_train.predict", str(run), str(root / "bottom_right.png"), "--top-k", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].split()[0] == "bottom-right", proc.stdout


def test_verify_resume_is_bitwise_on_user_code(project):
    root, _, _ = project
    proc = tool("ddp_train.verify_resume", "--step", "5", "--root", str(root / "verify"), SMOKE, *USER_ARGS,
                "train.max_steps=10", cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "(bitwise equal: True); losses after step 5 match: True" in proc.stdout


def test_a_slow_first_rank_times_nobody_out(tmp_path):
    """Rank 0 prepares the data alone for 8 s while the others wait, then every rank takes 8 s to open it,
    and rank 1's first training forward takes 8 s more (a slow first compile), with parallel.timeout_s=5:
    start-up and the first steps are bounded by parallel.init_timeout_s instead, so no rank times out.
    (With parallel.init_timeout_s=5 the same run fails with gloo's timeout.) The margins: 3 s between the
    delays and the timeout, and 5 s of skew allowed between the ranks once warm (a loaded 2-vCPU VM). A rank
    that really hangs (hang_timeout_s) leaves its stacks in hang/, which the failure message shows."""
    root = write_user_project(tmp_path)
    run_dir = root / "runs" / "slow"
    proc = run_engine([SMOKE, *USER_ARGS, "data.name=quads.data:slow_quadrants", "data.kwargs.delay=8",
                       "model.name=quads.nets:slow_first_step_cnn", "model.kwargs.delay=8",
                       "train.max_steps=6", "parallel.timeout_s=5", "parallel.hang_timeout_s=12",
                       f"run.root={root / 'runs'}", "run.name=slow"], nproc=2, cwd=root)
    stacks = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(run_dir.glob("hang/*.txt")))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}{stacks}"
    assert "done: val/top1" in proc.stdout
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 6


def test_a_timm_model_trains_on_two_processes_and_exports_to_onnx(tmp_path):
    check(run_engine([SMOKE, "model.name=timm/test_resnet", "data.name=synthetic", "data.synthetic_shape=[3,32,32]",
                      "data.synthetic_test_size=64", "train.max_steps=3", "train.global_batch_size=8",
                      f"run.root={tmp_path}", "run.name=timm"], nproc=2))
    summary = json.loads((tmp_path / "timm" / "summary.json").read_text())
    assert summary["step"] == 3 and summary["world_size"] == 2
    proc = tool("ddp_train.export", str(tmp_path / "timm"), "--format", "onnx")
    assert proc.returncode == 0 and "(ok," in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("overrides, needle", [
    (["model.name=no_such_module:f"], "model.name=no_such_module:f: cannot import 'no_such_module': it was not found"),
    (["model.name=broken:f"], "the module it imports, 'not_installed_package_xyz', was not found"),
    (["model.name=quads.nets:smal_cnn"], "module 'quads.nets' has no attribute 'smal_cnn'; did you mean 'small_cnn'?"),
    (["model.name=quads.nets:raising"], "model.name=quads.nets:raising raised ValueError: width must be even (nets.py:"),
    (["model.name=quads.nets:not_a_module"], "returned dict, not a torch.nn.Module"),
    (["model.name=quads.nets:small_cnn", "model.kwargs.depth=2"], "cannot be called as factory(num_classes=..."),
    (["data.name=quads.data:bad_samples"], "train[0] is (a list, a str); samples must be (float image tensor"),
    (["train.loss=quads.losses:per_sample"], "returned a tensor of shape [2]; it must return a scalar"),
    (["model.name=timm/resnet_18"], "timm has no architecture 'resnet_18'; closest: timm/resnet18"),
])
def test_bad_user_code_is_one_line_naming_it_and_exit_2(tmp_path, monkeypatch, capsys, overrides, needle):
    """In this process (each case would cost a torch start as a subprocess): the engine's own command line."""
    from ddp_train.__main__ import run_command

    write_user_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = [SMOKE, "train.loss=quads.losses:smoothed", "data.name=synthetic", "data.synthetic_shape=[3,12,12]",
            *overrides, f"run.root={tmp_path / 'runs'}"]
    if not any(o.startswith("model.name") for o in overrides):
        args.append("model.name=quads.nets:small_cnn")
    assert run_command(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and needle in err[0], err
    assert not list((tmp_path / "runs").rglob("metrics.jsonl"))


def test_ddp_train_front_end_refuses_an_unimportable_model_before_torchrun_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ddp_train.cli", "--nproc-per-node", "2", SMOKE,
                           "model.name=nowhere.models:net"], cwd=tmp_path, env=engine_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "torch.distributed" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "ddp-train: error: model.name=nowhere.models:net: cannot import 'nowhere.models': it was not found (No "
        "module named 'nowhere'); run from the directory that holds it or add that directory to PYTHONPATH"]
