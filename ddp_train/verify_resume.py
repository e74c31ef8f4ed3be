"""`python -m ddp_train.verify_resume [CONFIG] [overrides] [--nproc-per-node N] [--step K]`: trains the config
uninterrupted, then again interrupted at a random step (a simulated preemption: the same save-and-exit
path a SIGTERM takes) and resumed, and compares. Exit 0 only when the final parameters are bitwise equal
and the logged losses after the interruption match exactly."""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .config.argv import engine_command
from .errors import PREEMPTED_EXIT


def _launch(args: list[str], nproc: int) -> int:
    return subprocess.run(engine_command(args, nproc)).returncode


def _final(run_dir: Path) -> tuple[dict, list[tuple[int, float]]]:
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = {}
    for r in rows:  # a resumed run may log a step again: the last value is the one that counts
        if "train/loss" in r:
            losses[r["step"]] = r["train/loss"]
    return state, sorted(losses.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ddp_train.verify_resume", description=__doc__)
    ap.add_argument("--nproc-per-node", type=int, default=1)
    ap.add_argument("--step", type=int, default=None, help="interrupt after this step (default: random)")
    ap.add_argument("--root", default=None, help="where the two runs go (default: a temp dir)")
    ap.add_argument("engine_args", nargs="*", help="[CONFIG.yaml] [key=value ...]")
    a = ap.parse_args(argv)
    from .config import load_config
    from .config.argv import split_argv
    from .errors import USER_ERROR_EXIT, UserError, report

    try:
        config_path, overrides, _ = split_argv(a.engine_args)
        load_config(config_path, overrides)  # a bad config fails here, before three launches
    except UserError as e:
        return report("verify_resume", e)
    root = Path(a.root or tempfile.mkdtemp(prefix="verify_resume-"))
    tag = time.strftime("%Y%m%d-%H%M%S")
    common = a.engine_args + [f"run.root={root}", "checkpoint.resume=auto", "log.wandb.mode=disabled",
                              "log.progress_bar=false", "train.log_every_steps=1"]
    print(f"[verify_resume] uninterrupted run -> {root}/full-{tag}", flush=True)
    if _launch(common + [f"run.name=full-{tag}"], a.nproc_per_node) != 0:
        print("verify_resume: the uninterrupted run failed", file=sys.stderr)
        return 1
    _, full_losses = _final(root / f"full-{tag}")
    total = full_losses[-1][0]
    if total < 2:
        print("verify_resume: the run is too short to interrupt (needs >= 2 steps)", file=sys.stderr)
        return USER_ERROR_EXIT
    k = a.step if a.step is not None else random.randint(1, total - 1)
    print(f"[verify_resume] interrupted run: preempted after step {k} of {total}, then resumed", flush=True)
    rc = _launch(common + [f"run.name=resumed-{tag}", f"checkpoint.simulate_preempt_at_step={k}"], a.nproc_per_node)
    if rc != PREEMPTED_EXIT and not (a.nproc_per_node > 1 and rc != 0):
        print(f"verify_resume: the interrupted run exited {rc}, expected {PREEMPTED_EXIT}", file=sys.stderr)
        return 1
    if _launch(common + [f"run.name=resumed-{tag}"], a.nproc_per_node) != 0:
        print("verify_resume: the resumed run failed", file=sys.stderr)
        return 1
    full, full_losses = _final(root / f"full-{tag}")
    resumed, resumed_losses = _final(root / f"resumed-{tag}")
    diff = max((full["model"][n].double() - resumed["model"][n].double()).abs().max().item() for n in full["model"])
    bitwise = all(torch.equal(full["model"][n], resumed["model"][n]) for n in full["model"])
    after = [(s, v) for s, v in full_losses if s > k]
    losses_match = after == [(s, v) for s, v in resumed_losses if s > k]
    print(f"interrupted after step {k}/{total}: max |param diff| = {diff:.3g} (bitwise equal: {bitwise}); "
          f"losses after step {k} match: {losses_match} ({len(after)} steps)")
    return 0 if bitwise and losses_match else 1


if __name__ == "__main__":
    sys.exit(main())
