"""Training throughput of the same model, batch and precision three ways, in one run:

  (a) seed:  the seeds' loop: torchvision-style Dataset (per-sample PIL image -> ToTensor -> Normalize),
             DataLoader(shuffle, batch 64), .to(device) per batch, loss.item() every 10 steps;
  (b) hand:  a minimal hand-written loop: the split normalised once on the device, batches sliced by a
             random permutation, no engine;
  (c) engine: ddp_train itself (in this process), and on CPU also 2 processes with gloo (torchrun).

  python benchmarks/throughput.py [--device auto|cpu|cuda] [--batch 64] [--precision auto|fp32|bf16]
                                  [--steps 300] [--warmup 25] [--compile] [--no-multi]

Prints one JSON line: samples/s of each, engine/hand and engine/seed ratios, peak memory, hardware.
Warm-up steps are excluded everywhere; the engine's figure comes from its own metrics.jsonl windows."""
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

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddp_train.config import DataConfig, ModelConfig, load_config  # noqa: E402
from ddp_train.config.argv import engine_command  # noqa: E402
from ddp_train.data import load as load_data  # noqa: E402
from ddp_train.models import build_model  # noqa: E402
from ddp_train.rundir.files import read_metrics  # noqa: E402
from ddp_train.tracking.sysinfo import peak_memory  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def fresh_model(args, info, device):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=args.model), info).to(device)
    if args.compile:
        model = torch.compile(model)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def timed(batches, step_fn, device, warmup: int, steps: int) -> float:
    """samples/s over `steps` steps after `warmup` steps."""
    done, start, samples = 0, None, 0
    for x, y in batches:
        if done == warmup:
            sync(device)
            start = time.perf_counter()
        step_fn(x, y, done)
        done += 1
        if done > warmup:
            samples += len(y)
        if done == warmup + steps:
            break
    sync(device)
    return samples / (time.perf_counter() - start)


def forever(make_epoch):
    while True:
        yield from make_epoch()


def seed_loop(args, split, info, device) -> float:
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])

    class Digits(torch.utils.data.Dataset):  # what torchvision.datasets.MNIST.__getitem__ does
        def __len__(self):
            return len(split.labels)

        def __getitem__(self, i):
            return tf(Image.fromarray(split.images[i, 0].numpy(), mode="L")), int(split.labels[i])

    cuda = device.type == "cuda"  # pytorch/examples: 1 worker + pin_memory on CUDA only
    loader = torch.utils.data.DataLoader(Digits(), batch_size=args.batch, shuffle=True,
                                         num_workers=1 if cuda else 0, pin_memory=cuda)
    model, opt = fresh_model(args, info, device)
    model.train()

    def step(x, y, i):
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        with autocast(device, args.precision):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if i % 10 == 0:
            loss.item()  # the seed prints the loss every log_interval=10 batches

    return timed(forever(lambda: iter(loader)), step, device, args.warmup, args.steps)


def hand_loop(args, split, info, device) -> float:
    mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
    x_all = (split.images.to(device).float() / 255 - mean) / std
    y_all = split.labels.to(device)
    model, opt = fresh_model(args, info, device)
    model.train()
    n = len(y_all) // args.batch * args.batch

    def epoch():
        perm = torch.randperm(len(y_all), device=device)[:n].view(-1, args.batch)
        for idx in perm:
            yield x_all[idx], y_all[idx]

    def step(x, y, i):
        opt.zero_grad(set_to_none=True)
        with autocast(device, args.precision):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return timed(forever(epoch), step, device, args.warmup, args.steps)


def engine_overrides(args, run_root: Path, name: str) -> list[str]:
    return [f"run.root={run_root}", f"run.name={name}", f"model.name={args.model}", "data.name=mnist_mini",
            "data.augment=false", f"train.global_batch_size={args.batch}", f"train.precision={args.precision}",
            "train.epochs=1000", f"train.max_steps={args.warmup + args.steps}", f"train.log_every_steps={args.warmup}",
            "train.eval_every_epochs=1000", f"train.compile={'default' if args.compile else 'false'}",
            "optim.name=adam", "optim.lr=1e-3", "sched.name=constant", "checkpoint.every_epochs=null",
            "log.wandb.mode=disabled", "log.progress_bar=false"]


def engine_single(args, run_root: Path) -> tuple[float, dict]:
    from ddp_train.engine.run import run

    cfg = load_config(None, engine_overrides(args, run_root, "single"))
    assert run(cfg) == 0
    run_dir = run_root / "single"
    return window_rate(run_dir, args), json.loads((run_dir / "summary.json").read_text())


def engine_multi(args, run_root: Path, nproc: int) -> tuple[float, dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    cmd = engine_command(engine_overrides(args, run_root, "multi"), nproc)
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=1800)
    return window_rate(run_root / "multi", args), json.loads((run_root / "multi" / "summary.json").read_text())


def window_rate(run_dir: Path, args) -> float:
    windows = [r for r in read_metrics(run_dir) if "train/step_time_s" in r and r["step"] > args.warmup]
    steps = len(windows) * args.warmup
    return steps * args.batch / sum(r["train/step_time_s"] * args.warmup for r in windows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--model", default="cnn_dropout")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--steps", type=int, default=300, help="timed steps (a multiple of --warmup)")
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-multi", action="store_true", help="skip the 2-process gloo engine run (CPU)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds of hand/seed/engine, in rotating order; medians are reported (shared VMs are noisy)")
    args = p.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    args.precision = ("bf16" if cuda else "fp32") if args.precision == "auto" else args.precision
    args.steps = max(args.warmup, args.steps // args.warmup * args.warmup)
    splits = load_data(DataConfig(name="mnist_mini"))

    result = {"device": torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)",
              "model": args.model, "batch": args.batch, "precision": args.precision, "compile": args.compile,
              "steps": args.steps, "warmup": args.warmup, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "host": platform.node(),
              "date": time.strftime("%Y-%m-%d")}
    runs: dict[str, list[float]] = {"hand": [], "seed": [], "engine": []}
    with tempfile.TemporaryDirectory() as tmp:
        measure = {"hand": lambda i: hand_loop(args, splits.train, splits.info, device),
                   "seed": lambda i: seed_loop(args, splits.train, splits.info, device),
                   "engine": lambda i: engine_single(args, Path(tmp) / str(i))}
        order = list(measure)
        for i in range(args.repeats):
            for name in order[i % 3:] + order[:i % 3]:  # rotate, so no method always runs first
                value = measure[name](i)
                if name == "engine":
                    value, summary = value
                runs[name].append(value)
        for name, values in runs.items():
            result[name] = statistics.median(values)
            result[f"{name}_runs"] = [round(v, 1) for v in values]
        result["engine_peak_rss_gb"] = summary["peak_rss_gb_per_rank"]
        if cuda:
            result["engine_peak_gpu_mem_gb"] = summary.get("peak_gpu_mem_gb_per_rank")
        if not cuda and not args.no_multi:
            result["engine_2proc_gloo"], multi = engine_multi(args, Path(tmp), 2)
            result["engine_2proc_peak_rss_gb_per_rank"] = multi["peak_rss_gb_per_rank"]
    result["engine_over_hand"] = result["engine"] / result["hand"]
    result["engine_over_seed"] = result["engine"] / result["seed"]
    # Within a round the three ran minutes apart at most: the median of per-round ratios cancels the drift
    # of a shared machine better than the ratio of medians.
    result["engine_over_hand_paired"] = statistics.median(e / h for e, h in zip(runs["engine"], runs["hand"]))
    result["engine_over_seed_paired"] = statistics.median(e / s for e, s in zip(runs["engine"], runs["seed"]))
    result["bench_peak_rss_gb"] = peak_memory(device)["peak_rss_gb"]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}), flush=True)


if __name__ == "__main__":
    main()
