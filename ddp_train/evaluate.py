"""`python -m ddp_train.evaluate RUN_DIR [--checkpoint PATH] [--split val|train]` (or under torchrun):
exact loss, top-1, top-5 and per-class accuracy of a run's checkpoint, the confusion matrix (PNG + CSV),
a grid of the most confident mistakes (PNG) and every prediction (CSV). Writes RUN_DIR/eval.json and
RUN_DIR/eval/."""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from . import dist
from .env import from_env
from .errors import UserError, report
from .rundir import files
from .rundir.trained import add_checkpoint_args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddp_train.evaluate", description=__doc__)
    p.add_argument("run_dir")
    add_checkpoint_args(p)
    p.add_argument("--split", default="val", choices=["val", "train"], help="val = the test/val split")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--data-root", default=None, help="where the dataset is, if not the run's data.root")
    p.add_argument("--mistakes", type=int, default=16, help="how many confident mistakes to draw")
    args = p.parse_args(argv)
    env = from_env()
    try:
        return evaluate_run(args, env)
    except UserError as e:
        return report("ddp_train.evaluate", e, env.rank)
    finally:
        dist.teardown()


def evaluate_run(args, env) -> int:
    from .data import EvalBatches, load_distributed, use_device_resident
    from .engine.evaluation import evaluate
    from .engine.loss import CrossEntropy, build_loss
    from .rundir.trained import from_args

    run_dir = Path(args.run_dir)
    cfg, info, model, path, step = from_args(args)
    if args.data_root:
        cfg.data.root = args.data_root
    dist.init(env, cfg.parallel.backend, cfg.parallel.timeout_s, cfg.parallel.init_timeout_s)
    device = env.device
    model.to(device)
    splits = load_distributed(env, cfg.data)
    split = splits.test if args.split == "val" else splits.train
    if args.split == "train" and hasattr(split, "transform") and hasattr(splits.test, "transform"):
        split.transform = splits.test.transform  # the evaluation pipeline, not random crops
    resident = use_device_resident(cfg.data, splits, device)
    batches = EvalBatches(split, info, env, cfg.data, args.batch_size or cfg.train.eval_batch_size, device,
                          resident, seed=cfg.run.seed)
    rows: list[tuple[int, int, int, float]] = []  # (sample index, true, predicted, confidence)

    def collect(logits: torch.Tensor, y: torch.Tensor) -> None:
        probs = torch.softmax(logits, dim=1)
        conf, pred = probs.max(dim=1)
        start = len(rows)
        for j, (t, p_, c) in enumerate(zip(y.tolist(), pred.tolist(), conf.tolist())):
            rows.append((batches.shard[start + j], t, p_, c))

    loss_fn = build_loss(cfg.train, info.num_classes)
    result = evaluate(model, batches, info.num_classes, device, dummy_input=batches.dummy_input(), on_batch=collect,
                      loss_fn=None if isinstance(loss_fn, CrossEntropy) else loss_fn)
    batches.close()
    gathered = [r for part in dist.all_gather_object(rows) for r in part]
    if env.is_main:
        write_outputs(run_dir, args, cfg, info, split, result, sorted(gathered), path, step, env.world_size)
    return 0


def write_outputs(run_dir: Path, args, cfg, info, split, result: dict, rows, path: Path, step: int,
                  world_size: int) -> None:
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    names = info.class_names or [str(i) for i in range(info.num_classes)]
    correct, total = result["per_class"]
    per_class = {names[i]: (correct[i].item() / total[i].item() if total[i] else None)
                 for i in range(info.num_classes)}
    if result["confusion"] is not None:  # too many classes: per-class accuracy only
        files.write_confusion(result["confusion"], names, out)
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "true", "predicted", "confidence"])
        w.writerows([(i, names[t], names[p_], f"{c:.6f}") for i, t, p_, c in rows])
    mistakes = sorted((r for r in rows if r[1] != r[2]), key=lambda r: -r[3])[: args.mistakes]
    write_mistakes(out / "mistakes.png", mistakes, split, info, names)
    summary = {"split": args.split, "checkpoint": str(path), "step": step, "loss": result["loss"],
               "top1": result["top1"], "top5": result["top5"], "count": result["count"],
               "per_class_accuracy": per_class, "mistakes": len([r for r in rows if r[1] != r[2]]),
               "world_size": world_size, "model": cfg.model.name, "dataset": cfg.data.name}
    files.write_json(run_dir / "eval.json", summary)
    print(f"{args.split}: top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f}, loss {result['loss']:.4f} "
          f"on {result['count']} samples (step {step}); wrote {run_dir / 'eval.json'} and {out}/")


def write_mistakes(png: Path, mistakes, split, info, names) -> None:
    """The most confident wrong predictions, as the model saw them (de-normalised)."""
    plt = files.pyplot()
    n = max(1, len(mistakes))
    cols = min(8, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(2 * cols, 2.3 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    mean = torch.tensor(info.mean).view(-1, 1, 1)
    std = torch.tensor(info.std).view(-1, 1, 1)
    for ax, (index, true, pred, conf) in zip(axes.flat, mistakes):
        if hasattr(split, "images"):
            image = split.images[index].float() / 255
        else:
            image = (split[index][0] * std + mean).clamp(0, 1)
        image = image.permute(1, 2, 0).squeeze(-1).numpy()
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.set_title(f"{names[true]} -> {names[pred]}\n{conf:.2f}", fontsize=8)
    if not mistakes:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
