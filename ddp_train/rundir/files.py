"""Files a finished run leaves for people: summary.json, loss/accuracy curves, confusion matrix (PNG+CSV).
Reads metrics.jsonl, so it also works on a run directory after the fact."""
from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a kill: skip it, keep the rest
    return rows


def git_sha() -> str | None:
    for cwd in (Path.cwd(), Path(__file__).resolve().parent):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                 timeout=10)
            if out.returncode == 0:
                return out.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def versions() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name: str) -> str | None:  # read from the metadata: importing torchvision costs ~0.7 s
        try:
            return version(name)
        except PackageNotFoundError:  # e.g. run from a checkout that was never installed
            return None
    return {"ddp_train": installed("ddp_train"), "torch": torch.__version__, "torchvision": installed("torchvision"),
            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "host": platform.node()}


def data_info(cfg, info, code_paths: list[str] = ()) -> dict[str, Any]:
    """The model's input contract: classes, channels, size, normalisation, the eval resize, and where the
    user's modules were imported from (tools run elsewhere add these to sys.path)."""
    from ..data.types import eval_resize

    resize = eval_resize(cfg.image_size, cfg.resize_size) if cfg.name == "imagefolder" else None
    return {"dataset": cfg.name, "num_classes": info.num_classes, "in_channels": info.in_channels,
            "image_size": list(info.image_size), "resize": resize, "mean": list(info.mean),
            "std": list(info.std), "class_names": list(info.class_names), "code_paths": list(code_paths)}


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_confusion(confusion: torch.Tensor, class_names: list[str], plots_dir: Path) -> None:
    plots_dir.mkdir(parents=True, exist_ok=True)
    names = class_names or [str(i) for i in range(len(confusion))]
    with open(plots_dir / "confusion_matrix.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true\\predicted"] + names)
        for name, row in zip(names, confusion.tolist()):
            w.writerow([name] + row)
    n = len(names)
    fig = figure(figsize=(max(4, 0.5 * n + 2), max(4, 0.5 * n + 2)))
    ax = fig.subplots()
    ax.imshow(confusion.numpy(), cmap="Blues")
    if n <= 30:
        ax.set_xticks(range(n), names, rotation=90)
        ax.set_yticks(range(n), names)
        vmax = confusion.max().item() or 1
        for i in range(n):
            for j in range(n):
                v = int(confusion[i, j])
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if v > vmax / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    fig.tight_layout()
    fig.savefig(plots_dir / "confusion_matrix.png", dpi=100)


def write_curves(run_dir: Path) -> None:
    rows = read_metrics(run_dir)
    plots = Path(run_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    fig = figure(figsize=(11, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, ax in (("train/loss", ax_loss), ("val/loss", ax_loss), ("val/top1", ax_acc), ("val/top5", ax_acc)):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key.startswith("val") else None, markersize=3, label=key)
    ax_loss.set_title("loss")
    ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "curves.png", dpi=100)


def figure(**kwargs):
    """A matplotlib Figure without pyplot (whose import is ~0.25 s more, paid at every run's end): no
    global figure state to close, and Agg, so headless clusters need no display."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless clusters have no display
    import matplotlib.pyplot as plt

    return plt
