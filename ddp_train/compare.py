"""Compare runs from their run directories, no W&B needed:

  python -m ddp_train.compare RUN_DIR|GLOB|WANDB_GROUP ... [--metric val/top1] [--plot out.png] [--root runs]

Prints one row per run with only the config keys whose values differ between the runs, then the final
metrics; writes a PNG of the chosen metric's curve for every run. A name that is neither a run directory
nor a glob is looked up as a W&B group (log.wandb.group) among the runs under --root."""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from .config import flatten
from .errors import UserError, report
from .rundir.files import read_metrics

IGNORED = {"run.name"}  # already the row's label
FINAL = ["val/top1", "val/top5", "val/loss", "best/val_top1", "samples_per_s", "wall_time_s"]


def _is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file()


def _runs_under(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if _is_run(p)) if root.is_dir() else []


def resolve(names: list[str], root: Path) -> list[Path]:
    runs: list[Path] = []
    for name in names:
        path = Path(name)
        if _is_run(path):
            found = [path]
        elif glob.has_magic(name):
            found = sorted(p for p in map(Path, glob.glob(name)) if _is_run(p))
        else:
            found = [p for p in _runs_under(root) if flatten(load_config(p)).get("log.wandb.group") == name]
        if not found:
            raise UserError(f"{name!r} is not a run directory (no config.yaml), matches none by glob, and no run "
                            f"under {root} has log.wandb.group={name}")
        runs += [p for p in found if p not in runs]
    return runs


def load_config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text()) or {}


def load_summary(run: Path) -> dict:
    try:
        return json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return {}  # unfinished or preempted: the table says so


def differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    keys = sorted(set().union(*configs) - IGNORED)
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(runs: list[Path], metric: str) -> str:
    configs = [flatten(load_config(r)) for r in runs]
    diff = differing_keys(configs)
    finals = FINAL if metric in FINAL else [metric, *FINAL]
    header = ["run", *diff, *finals]
    rows = []
    for run, cfg in zip(runs, configs):
        summary = load_summary(run)
        last = _last_value(run, metric) if metric not in summary else summary[metric]
        values = {**summary, metric: last}
        rows.append([run.name, *(_fmt(cfg.get(k)) for k in diff),
                     *(_fmt(values.get(k)) for k in finals)])
        if not summary:
            rows[-1][0] += " (no summary.json: unfinished)"
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    if not diff:
        lines.append("(the runs' configs are identical)")
    return "\n".join(lines)


def _last_value(run: Path, metric: str) -> float | None:
    values = [r[metric] for r in read_metrics(run) if metric in r]
    return values[-1] if values else None


def plot(runs: list[Path], metric: str, out: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for run in runs:
        points = [(r["step"], r[metric]) for r in read_metrics(run) if metric in r and "step" in r]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, label=run.name)
            drawn += 1
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: {len(runs)} runs")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddp_train.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories, globs (quote them) or a W&B group name")
    p.add_argument("--metric", default="val/top1", help="curve to plot and final value to show (default val/top1)")
    p.add_argument("--plot", default=None, help="PNG path (default: compare_<metric>.png here)")
    p.add_argument("--root", default="runs", help="where W&B group names are looked up (default runs)")
    args = p.parse_args(argv)
    try:
        runs = resolve(args.runs, Path(args.root))
        print(table(runs, args.metric))
        out = Path(args.plot or f"compare_{args.metric.replace('/', '_')}.png")
        drawn = plot(runs, args.metric, out)
        if not drawn:
            raise UserError(f"no run logged {args.metric!r} in metrics.jsonl; try --metric train/loss or val/loss")
        print(f"wrote {out} ({drawn} curves)")
        return 0
    except UserError as e:
        return report("ddp_train.compare", e)


if __name__ == "__main__":
    sys.exit(main())
