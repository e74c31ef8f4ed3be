"""Wall time for a config (default: the embedded default on mnist_mini) to first reach a test top-1.

  python benchmarks/time_to_accuracy.py [--nproc 2] [--target 0.97] [--seeds 0,1,2] [CONFIG] [key=value ...]

Runs the engine as users do (torchrun --standalone, or python -m ddp_train for --nproc 1) and reads the
evaluation records in metrics.jsonl: the clock starts when the launcher starts (process start-up, data
loading and the first evaluations included). Prints one JSON line per seed and a summary line."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddp_train.config.argv import engine_command  # noqa: E402
from ddp_train.rundir.files import read_metrics  # noqa: E402


def one_run(args, seed: int, root: Path) -> dict:
    overrides = [*args.rest, f"run.root={root}", f"run.name=seed{seed}", f"run.seed={seed}",
                 "log.wandb.mode=disabled", "log.progress_bar=false"]
    cmd = engine_command(overrides, args.nproc)
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    start = time.time()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=7200)
    wall = time.time() - start
    run_dir = root / f"seed{seed}"
    evals = [r for r in read_metrics(run_dir) if "val/top1" in r]
    hit = next((r for r in evals if r["val/top1"] >= args.target), None)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"seed": seed, "time_to_target_s": round(hit["time"] - start, 2) if hit else None,
            "epoch_reached": hit["epoch"] if hit else None, "final_top1": summary["val/top1"],
            "wall_s": round(wall, 2), "samples_per_s": round(summary["samples_per_s"], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--target", type=float, default=0.97)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("rest", nargs="*", help="CONFIG and key=value overrides (default: the embedded default)")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            results.append(one_run(args, seed, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    times = [r["time_to_target_s"] for r in results if r["time_to_target_s"] is not None]
    print(json.dumps({"config": args.rest or "embedded default", "nproc": args.nproc, "target": args.target,
                      "reached": f"{len(times)}/{len(results)}",
                      "median_time_to_target_s": statistics.median(times) if times else None,
                      "host": platform.node(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
    main()
