"""Vision workloads on a tiny image folder the test writes as real PNG files: resnet18 and
efficientnet_b0 trained with 2 processes, the evaluate / export / predict tools on the result, and the
errors for unreadable images."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, check, engine_env, run_engine

pytestmark = pytest.mark.slow
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]  # one colour per class: learnable in a few steps


def write_folder(root, per_class=(8, 4)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c, colour in enumerate(COLOURS):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(colour, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


def folder_args(data, runs, name, model):
    return ["data.name=imagefolder", f"data.root={data}", "data.image_size=32", "data.num_workers=1",
            f"model.name={model}", "train.global_batch_size=8", "train.epochs=2", "train.eval_batch_size=4",
            "optim.name=adam", "optim.lr=3e-3", "log.progress_bar=false", f"run.root={runs}", f"run.name={name}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("vision")
    data, runs = write_folder(base / "images"), base / "runs"
    for model in ("resnet18", "efficientnet_b0"):
        check(run_engine(folder_args(data, runs, model, model), nproc=2))
    return data, runs


def tool(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=engine_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("model", ["resnet18", "efficientnet_b0"])
def test_torchvision_models_train_on_an_image_folder_with_two_processes(trained, model):
    _, runs = trained
    summary = json.loads((runs / model / "summary.json").read_text())
    assert (summary["world_size"], summary["step"], summary["val/count"]) == (2, 6, 12)  # 24 images / 8, 2 epochs
    info = json.loads((runs / model / "data_info.json").read_text())
    assert info["class_names"] == ["class_0", "class_1", "class_2"] and info["resize"] == 37


def test_evaluate_writes_eval_json_whose_top1_matches_a_hand_computation(trained):
    data, runs = trained
    run = runs / "resnet18"
    proc = tool("ddp_train.evaluate", str(run))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((run / "eval.json").read_text())
    with open(run / "eval" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == result["count"] == 12
    assert result["top1"] == sum(r["true"] == r["predicted"] for r in rows) / len(rows)
    # ...and by hand, independently of the tool: the checkpoint's model on the val images.
    from ddp_train.data import load
    from ddp_train.rundir.trained import load_trained

    cfg, _, model, _, _ = load_trained(run)
    cfg.data.root = str(data)
    val = load(cfg.data).test
    with torch.no_grad():
        logits = torch.cat([model(torch.stack([val[i][0] for i in range(j, min(j + 4, len(val)))]))
                            for j in range(0, len(val), 4)])
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    assert result["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    per_class = result["per_class_accuracy"]
    assert set(per_class) == {"class_0", "class_1", "class_2"}
    assert sum(per_class.values()) / 3 == pytest.approx(result["top1"])  # 4 images per class
    for name in ("confusion_matrix.csv", "confusion_matrix.png", "mistakes.png"):
        assert (run / "eval" / name).stat().st_size > 0, name


def test_onnx_export_round_trips_within_tolerance(trained):
    _, runs = trained
    proc = tool("ddp_train.export", str(runs / "resnet18"), "--format", "onnx", "--dynamic-batch")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    diff = float(proc.stdout.split("max |logit diff| = ")[1].split()[0])
    assert diff <= 1e-4
    import onnxruntime as ort

    from ddp_train.rundir.trained import load_trained

    _, _, model, _, _ = load_trained(runs / "resnet18")
    x = torch.randn(5, 3, 32, 32)  # a batch size the export never saw
    session = ort.InferenceSession(str(runs / "resnet18" / "export" / "model.onnx"))
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        assert (got - model(x)).abs().max().item() <= 1e-4


def test_predict_prints_k_classes_with_probabilities_summing_to_at_most_one(trained):
    data, runs = trained
    images = [str(data / "val" / "class_0" / "0.png"), str(data / "val" / "class_2" / "1.png")]
    proc = tool("ddp_train.predict", str(runs / "efficientnet_b0"), *images, "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == images[0] and lines[3] == images[1]
    for block in (lines[1:3], lines[4:6]):
        probs = [float(line.split()[-1]) for line in block]
        assert all(line.split()[0].startswith("class_") for line in block)
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_a_corrupt_png_is_a_one_line_error_naming_the_file_or_is_skipped_and_counted(tmp_path):
    data = write_folder(tmp_path / "images", per_class=(4, 2))
    bad = data / "train" / "class_1" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then not an image")
    args = folder_args(data, tmp_path / "runs", "bad", "resnet18")
    proc = run_engine(args)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and f"cannot read image {bad}" in errors[0] and "data.skip_corrupt=true" in errors[0]
    proc = check(run_engine([*args, "run.name=skipping", "data.skip_corrupt=true"]))
    assert f"skipped 1 unreadable image(s) in {data / 'train'}" in proc.stdout + proc.stderr
