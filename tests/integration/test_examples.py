"""The Python API and examples/quickstart: a user's project run in-process from Python with objects, and
the notebook executed top to bottom in a real Jupyter kernel (nbclient + ipykernel), as users run it."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import ROOT, write_user_project

pytestmark = pytest.mark.slow


def test_fit_with_objects_in_process_writes_the_same_run_directory(tmp_path, monkeypatch):
    """world size 1, in this process: a model factory (importable: recorded by path), datasets as objects
    (uint8 tensors: the device-resident path) and a loss function."""
    import ddp_train

    write_user_project(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from quads.losses import smoothed
    from quads.nets import small_cnn

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (256,), generator=g)
    images = (torch.rand(256, 1, 8, 8, generator=g) * 80 + labels.view(-1, 1, 1, 1) * 150).to(torch.uint8)
    train = torch.utils.data.TensorDataset(images[:192], labels[:192])
    test = torch.utils.data.TensorDataset(images[192:], labels[192:])
    result = ddp_train.fit({"train": {"epochs": 3, "global_batch_size": 32}, "log": {"wandb": {"mode": "disabled"}}},
                           model=small_cnn, data=(train, test), loss=smoothed,
                           overrides=[f"run.root={tmp_path / 'runs'}", "run.name=api", "log.progress_bar=false"])
    assert result.exit_code == 0 and result.run_dir == tmp_path / "runs" / "api"
    assert result.summary["val/count"] == 64 and result.summary["val/top1"] == 1.0  # two separable classes
    cfg = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert cfg["model"]["name"] == "quads.nets:small_cnn" and cfg["train"]["loss"] == "quads.losses:smoothed"
    assert cfg["data"]["name"].startswith("<object>:")
    assert "device-resident" in (result.run_dir / "train.log").read_text()
    assert [r["step"] for r in result.metrics if "val/top1" in r] == [6, 12, 18]


def test_the_quickstart_notebook_runs_top_to_bottom_in_a_jupyter_kernel(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    project = tmp_path / "quickstart"
    shutil.copytree(ROOT / "examples" / "quickstart", project, ignore=shutil.ignore_patterns("runs"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    nb = nbformat.read(project / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(project)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the curves and the confusion matrix
    final = float(text.split("final test top-1: ")[1].split()[0])
    assert final >= 0.95, text[-2000:]
    summary = json.loads((project / "runs" / "torchrun-2" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["val/top1"] == pytest.approx(final, abs=5e-4)
    assert json.loads((project / "runs" / "in-process" / "summary.json").read_text())["world_size"] == 1
