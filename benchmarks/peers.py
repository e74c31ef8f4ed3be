"""ddp_train against the hand loop and its peers on one identical workload, interleaved window by window.

  python benchmarks/peers.py [--data-path device|dataloader] [--nproc 1|2] [--device cpu|cuda]
                             [--rounds 5] [--steps 160] [--window 20] [--warmup-windows 2]
                             [--threads N] [--contenders hand,hand_dl,...] [--no-startup] [--json PATH]
                             [--engine-override KEY=VALUE ...]

Six contenders (benchmarks/peer_loops.py): hand (pre-normalised tensors, randperm), hand_dl (the hand loop
fed by a DataLoader), lightning (Trainer), fabric, accelerate and ddp_train (`python -m ddp_train
model.name=peer_loops:cnn ...`). Workload: the seeds' CNN with dropout 0.5, Adam 1e-3 constant, fp32,
global batch 64 (64 // nproc per rank), mnist_mini's 4000 training digits, the same intra-op threads for
all. --data-path device: every contender but hand_dl slices batches from the split kept on the device;
dataloader: every contender but hand uses a DataLoader with 2 workers (ddp_train: data.device_resident=false
data.num_workers=2). --nproc 2 runs every contender under torchrun (gloo on CPU, NCCL on CUDA).

How it is timed: every contender is one long-running process (a torchrun job for --nproc 2), started
once. The model's forward is the only hook: every `window` steps it reports the window's wall time and
ru_minflt delta (waits excluded) and blocks until this script gives the contender its next turn, so only
one contender runs at a time. A cycle is one window of every contender (the order rotates from cycle to
cycle); a round is steps/window cycles. A contender's ratio in a cycle is its samples/s over the
baseline's in the same cycle (baseline: hand on the device path, hand_dl on the DataLoader path), so the
machine's drift cancels; a round's ratio is the median of its cycles. Start-up: a separate pass, one
contender at a time, from launching the process until epoch 1's last step is done.

Prints a table and one JSON line (also written to --json PATH).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ALL = ["hand", "hand_dl", "lightning", "fabric", "accelerate", "ddp_train"]
FRAMEWORKS = ["lightning", "fabric", "accelerate"]  # "the peers" of the goal
GLOBAL_BATCH, TRAIN_SAMPLES = 64, 4000


def contender_command(name: str, args) -> list[str]:
    if args.nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    else:
        launch = [sys.executable]
    if name != "ddp_train":
        return launch + [str(HERE / "peer_loops.py"), name, "--data-path", args.data_path, "--device", args.device]
    resident = args.data_path == "device"
    overrides = [f"run.root={args.tmp}/runs", f"run.name=ddp_train-{time.time_ns()}", "run.seed=0",
                 "model.name=peer_loops:cnn", "data.name=mnist_mini", "data.augment=false",
                 f"data.device_resident={str(resident).lower()}", f"data.num_workers={0 if resident else 2}",
                 f"train.global_batch_size={GLOBAL_BATCH}", "train.precision=fp32", "train.epochs=100000",
                 "train.eval_every_epochs=100000", "optim.name=adam", "optim.lr=1e-3", "sched.name=constant",
                 "checkpoint.every_epochs=null", "log.wandb.mode=disabled", "log.progress_bar=false"]
    return launch + ["-m", "ddp_train"] + overrides + args.engine_overrides


def contender_env(name: str, args, startup_steps: int = 0) -> dict:
    env = dict(os.environ, PEERS_DIR=args.tmp, PEERS_NAME=name, PEERS_WINDOW=str(args.window),
               PEERS_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads), WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if startup_steps:
        env["PEERS_STARTUP_STEPS"] = str(startup_steps)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


class Contender:
    def __init__(self, name: str, args, startup_steps: int = 0):
        self.name, self.nproc = name, args.nproc
        self.log = open(Path(args.tmp) / f"{name}{'.startup' if startup_steps else ''}.log", "w")
        self.started = time.time()
        self.proc = subprocess.Popen(contender_command(name, args), env=contender_env(name, args, startup_steps),
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=args.tmp, start_new_session=True)
        self.go = [] if startup_steps else [os.open(Path(args.tmp) / f"{name}.{r}.go", os.O_RDWR)
                                            for r in range(args.nproc)]

    def grant(self, token: bytes = b"g") -> None:
        for fd in self.go:
            os.write(fd, token)

    def fail(self, why: str) -> RuntimeError:
        self.log.flush()
        tail = Path(self.log.name).read_text()[-3000:]
        return RuntimeError(f"{self.name}: {why}\n--- its output (last 3000 characters) ---\n{tail}")

    def stop(self, timeout: float = 30) -> None:
        if self.go and self.proc.poll() is None:
            self.grant(b"q")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for fd in self.go:
            os.close(fd)
        self.go = []
        self.log.close()


class Reports:
    """The contenders' JSON lines, from the one FIFO every rank writes to."""

    def __init__(self, path: Path):
        os.mkfifo(path)
        self.fd = os.open(path, os.O_RDWR)  # never blocks, never sees EOF
        self.buf = b""

    def next(self, contenders: list[Contender], timeout: float) -> dict:
        deadline = time.time() + timeout
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.fd], [], [], 1.0)
            if ready:
                self.buf += os.read(self.fd, 65536)
                continue
            for c in contenders:
                if c.proc.poll() is not None:
                    raise c.fail(f"exited with code {c.proc.returncode}")
            if time.time() > deadline:
                raise RuntimeError(f"no report within {timeout:.0f} s")
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def collect(self, c: Contender, key: str, value, timeout: float) -> list[dict]:
        """One report from each of `c`'s ranks with report[key] == value."""
        got: dict[int, dict] = {}
        while len(got) < c.nproc:
            r = self.next([c], timeout)
            if r["name"] != c.name or r.get(key) != value:
                raise RuntimeError(f"unexpected report {r} while waiting for {c.name} {key}={value}")
            got[r["rank"]] = r
        return [got[k] for k in sorted(got)]


def startup_pass(names: list[str], args, reports: Reports) -> dict[str, float]:
    steps = TRAIN_SAMPLES // GLOBAL_BATCH  # epoch 1, as every contender cuts it (per-rank batch 64 // nproc)
    out = {}
    for name in names:
        c = Contender(name, args, startup_steps=steps)
        ends = [r["startup_end"] for r in reports.collect(c, "name", name, args.timeout)]
        out[name] = max(ends) - c.started
        c.stop()
    return out


def measure(names: list[str], args, reports: Reports) -> dict:
    """{name: {"rate": [[samples/s per cycle] per round], "minflt": [[per-rank-mean faults per step]...],
    "maxrss_kb": int, "threads": int}}"""
    cycles = args.steps // args.window
    contenders: dict[str, Contender] = {}
    data = {n: {"rate": [[] for _ in range(args.rounds)], "flt": [[] for _ in range(args.rounds)],
                "maxrss_kb": 0} for n in names}
    try:
        for n in names:  # one at a time: each start-up runs alone, the others wait blocked
            contenders[n] = c = Contender(n, args)
            ready = reports.collect(c, "ready", True, args.timeout)
            if any(r["world"] != args.nproc for r in ready):  # a contender that did not really go distributed
                raise c.fail(f"runs with a process group of {ready[0]['world']}, not {args.nproc}")
            data[n]["threads"] = ready[0]["threads"]
            print(f"[peers] {n} ready after {time.time() - c.started:.1f} s", file=sys.stderr, flush=True)
        window = 0

        def turn(n: str) -> list[dict]:
            c = contenders[n]
            c.grant()
            got = reports.collect(c, "window", window, args.timeout)
            data[n]["maxrss_kb"] = max(data[n]["maxrss_kb"], *(r["maxrss_kb"] for r in got))
            return got

        for _ in range(args.warmup_windows):
            for n in names:
                turn(n)
            window += 1
        k = 0
        for rnd in range(args.rounds):
            for _ in range(cycles):
                order = names[k % len(names):] + names[:k % len(names)]
                k += 1
                for n in order:
                    got = turn(n)
                    data[n]["rate"][rnd].append(args.window * GLOBAL_BATCH / got[0]["wall"])
                    data[n]["flt"][rnd].append(statistics.mean(r["minflt"] for r in got) / args.window)
                window += 1
            print(f"[peers] round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for c in contenders.values():
            c.stop()
    return data


def hardware(device: str) -> dict:
    import torch

    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    out = {"cpu": model, "cpu_count": os.cpu_count(), "cpus_available": len(os.sched_getaffinity(0)),
           "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
           "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("lightning", "accelerate"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def summarise(data: dict, baseline: str, rounds: int) -> dict:
    out = {}
    for n, d in data.items():
        per_round = [statistics.median(r / b for r, b in zip(d["rate"][i], data[baseline]["rate"][i]))
                     for i in range(rounds)]
        out[n] = {"ratio_per_round": [round(x, 4) for x in per_round],
                  "ratio_min": round(min(per_round), 4), "ratio_median": round(statistics.median(per_round), 4),
                  "ratio_max": round(max(per_round), 4),
                  "samples_per_s_median": round(statistics.median(x for r in d["rate"] for x in r), 1),
                  "faults_per_step_per_round": [round(statistics.mean(f), 1) for f in d["flt"]],
                  "peak_rss_gb": round(d["maxrss_kb"] / 1e6, 3), "threads": d["threads"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default="device", choices=["device", "dataloader"])
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=160, help="steps per contender per round (a multiple of --window)")
    p.add_argument("--window", type=int, default=20, help="steps per turn")
    p.add_argument("--warmup-windows", type=int, default=2, help="turns per contender before measuring")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads per process, for every contender (default: ddp_train's rule, the "
                        "CPUs over --nproc less the 2 DataLoader workers on the dataloader path, at least 1)")
    p.add_argument("--contenders", default=",".join(ALL))
    p.add_argument("--engine-override", dest="engine_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra ddp_train override (repeatable), e.g. train.nan_guard=false, to find a cost")
    p.add_argument("--no-startup", action="store_true", help="skip the start-up-to-end-of-epoch-1 pass")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for any one report")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs, ddp_train's run)")
    args = p.parse_args()
    names = [n for n in ALL if n in args.contenders.split(",")]
    baseline = "hand" if args.data_path == "device" else "hand_dl"
    if baseline not in names:
        p.error(f"--contenders must include the baseline {baseline}")
    if args.threads is None:
        workers = 2 if args.data_path == "dataloader" else 0
        cpus = len(os.sched_getaffinity(0)) if args.device == "cpu" else os.cpu_count()
        args.threads = max(1, cpus // args.nproc - workers)
    args.steps = max(args.window, args.steps // args.window * args.window)

    args.tmp = tempfile.mkdtemp(prefix="peers-")
    try:
        for n in names:
            for r in range(args.nproc):
                os.mkfifo(Path(args.tmp) / f"{n}.{r}.go")
        reports = Reports(Path(args.tmp) / "reports")
        data = measure(names, args, reports)
        startup = {} if args.no_startup else startup_pass(names, args, reports)
    finally:
        if args.keep:
            print(f"[peers] kept {args.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(args.tmp, ignore_errors=True)

    summary = summarise(data, baseline, args.rounds)
    for n, s in summary.items():
        s["startup_to_epoch1_s"] = round(startup[n], 2) if n in startup else None
    peers = [n for n in FRAMEWORKS if n in summary]
    best_peer = [max(summary[n]["ratio_per_round"][i] for n in peers) if peers else 0 for i in range(args.rounds)]
    ours = summary.get("ddp_train", {}).get("ratio_per_round")
    goal = None
    if ours:
        goal = {"min_ratio_ge_0.97": min(ours) >= 0.97,
                "ge_best_peer_every_round": all(o >= b for o, b in zip(ours, best_peer)),
                "best_peer_per_round": [round(b, 4) for b in best_peer]}
        goal["met"] = goal["min_ratio_ge_0.97"] and goal["ge_best_peer_every_round"]
    result = {"config": {"data_path": args.data_path, "nproc": args.nproc, "device": args.device,
                         "rounds": args.rounds, "steps": args.steps, "window": args.window,
                         "warmup_windows": args.warmup_windows, "threads": args.threads,
                         "global_batch": GLOBAL_BATCH, "baseline": baseline,
                         "engine_overrides": args.engine_overrides, "command": " ".join(sys.argv)},
              "hardware": hardware(args.device), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "contenders": summary, "goal": goal}

    print(f"\n{args.data_path} path, {args.nproc} process(es), {args.device}, {args.threads} thread(s) each; "
          f"ratio = samples/s over {baseline}'s in the same cycle, median per round")
    print(f"{'contender':<11} {'ratio med':>9} {'min..max':>13}  {'per round':<36} {'samples/s':>9} "
          f"{'faults/step by round':<32} {'RSS GB':>6} {'start-up s':>10}")
    for n, s in summary.items():
        su = s["startup_to_epoch1_s"]
        print(f"{n:<11} {s['ratio_median']:>9.3f} {s['ratio_min']:>6.3f}..{s['ratio_max']:<6.3f}  "
              f"{' '.join(f'{x:.3f}' for x in s['ratio_per_round']):<36} {s['samples_per_s_median']:>9.0f} "
              f"{' '.join(f'{x:.0f}' for x in s['faults_per_step_per_round']):<32} {s['peak_rss_gb']:>6.2f} "
              f"{su if su is not None else '-':>10}")
    if goal:
        print(f"goal (ddp_train >= 0.97 and >= best peer in every round): {'MET' if goal['met'] else 'NOT met'} "
              f"(best peer per round: {goal['best_peer_per_round']})")
    line = json.dumps(result)
    print(line, flush=True)
    if args.json:
        args.json.write_text(line + "\n")


if __name__ == "__main__":
    main()
