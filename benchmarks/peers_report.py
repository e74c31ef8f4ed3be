"""Markdown for docs/benchmarks.md from benchmarks/peers.py's JSON results:

  python benchmarks/peers_report.py device-1.json device-2.json ...

One heading line (the command, threads, baseline, date), the table, and the goal's verdict per file."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def markdown(result: dict) -> str:
    c, hw = result["config"], result["hardware"]
    command = re.sub(r" --json \S+", "", c["command"])  # where this copy of the result went
    head = (f"`python {command}` ({c['threads']} thread(s) per process, baseline `{c['baseline']}`, "
            f"{result['date']}; {hw['cpu']}, {hw['cpus_available']} CPUs, torch {hw['torch']}, lightning "
            f"{hw.get('lightning')}, accelerate {hw.get('accelerate')}{', ' + hw['gpu'] if hw.get('gpu') else ''})")
    rows = ["| contender | ratio, median of rounds | min..max | per round | samples/s (median window) | "
            "faults/step by round | peak RSS GB | start-up to end of epoch 1 s |",
            "| --- | ---: | ---: | --- | ---: | --- | ---: | ---: |"]
    for name, s in result["contenders"].items():
        label = f"**{name}**" if name == "ddp_train" else name
        startup = s.get("startup_to_epoch1_s")
        rows.append(f"| {label} | {s['ratio_median']:.3f} | {s['ratio_min']:.3f}..{s['ratio_max']:.3f} | "
                    f"{' '.join(f'{x:.3f}' for x in s['ratio_per_round'])} | {s['samples_per_s_median']:,.0f} | "
                    f"{' '.join(f'{x:.0f}' for x in s['faults_per_step_per_round'])} | {s['peak_rss_gb']:.2f} | "
                    f"{'-' if startup is None else f'{startup:.1f}'} |")
    goal = result.get("goal")
    verdict = ""
    if goal:
        ours = result["contenders"]["ddp_train"]["ratio_min"]
        verdict = (f"\nGoal: min {ours:.3f} {'≥' if goal['min_ratio_ge_0.97'] else '<'} 0.97; ≥ best peer in every "
                   f"round: {'yes' if goal['ge_best_peer_every_round'] else 'no'} (best peer per round "
                   f"{' '.join(f'{x:.3f}' for x in goal['best_peer_per_round'])}): "
                   f"**{'met' if goal['met'] else 'not met'}**.\n")
    return "\n".join([head, "", *rows, verdict])


def main() -> None:
    for path in sys.argv[1:]:
        print(markdown(json.loads(Path(path).read_text())))


if __name__ == "__main__":
    main()
