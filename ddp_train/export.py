"""`python -m ddp_train.export RUN_DIR --format onnx|torchscript [--dynamic-batch] [--checkpoint PATH]`:
exports the trained model to RUN_DIR/export/, then checks the export by running it (onnxruntime for
ONNX) on a batch and comparing with PyTorch's logits: prints the max abs difference and fails (exit 1)
above --tolerance (1e-4, fp32)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .errors import UserError, report
from .rundir.trained import add_checkpoint_args


def example_batch(info, n: int) -> torch.Tensor:
    """A reproducible normalised-looking batch of the model's input shape."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, info.in_channels, *info.image_size, generator=g)


def export_onnx(model, x: torch.Tensor, out: Path, dynamic_batch: bool) -> None:
    import warnings

    kwargs = {}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=["images"], output_names=["logits"],
                                    verbose=False,
                                    **kwargs)
    program.save(str(out))


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def export_torchscript(model, x: torch.Tensor, out: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; still widely deployed
        traced = torch.jit.trace(model, x, check_trace=False)
    traced.save(str(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddp_train.export", description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--format", default=None, choices=["onnx", "torchscript"])
    p.add_argument("--quantize", default=None, choices=["dynamic"],
                   help="int8 for CPU inference (static for convolutions, dynamic for Linear), checked on the "
                        "test split against fp32")
    p.add_argument("--max-drop", type=float, default=1.0, help="--quantize fails above this top-1 drop, in points")
    p.add_argument("--calibration-samples", type=int, default=256, help="--quantize: training samples to calibrate on")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size at inference (ONNX)")
    add_checkpoint_args(p)
    p.add_argument("--batch", type=int, default=4, help="batch used to trace and to check the export")
    p.add_argument("--tolerance", type=float, default=1e-4)
    args = p.parse_args(argv)
    if not args.format and not args.quantize:
        p.error("give --format onnx|torchscript, or --quantize dynamic")
    try:
        from .rundir.trained import from_args

        cfg, info, model, path, step = from_args(args)
        out_dir = Path(args.run_dir) / "export"
        out_dir.mkdir(exist_ok=True)
        if args.quantize:
            return quantize_run(args, cfg, info, model, path, step, out_dir)
    except UserError as e:
        return report("ddp_train.export", e)
    x = example_batch(info, args.batch)
    with torch.no_grad():
        expected = model(x)
    if args.format == "onnx":
        out = out_dir / "model.onnx"
        export_onnx(model, x, out, args.dynamic_batch)
        check_x = example_batch(info, args.batch + 3) if args.dynamic_batch else x  # another batch size
        with torch.no_grad():
            expected = model(check_x)
        got = run_onnx(out, check_x)
    else:
        out = out_dir / "model.torchscript.pt"
        export_torchscript(model, x, out)
        check_x = x
        got = torch.jit.load(str(out))(check_x).detach()
    diff = (got.float() - expected.float()).abs().max().item()
    ok = diff <= args.tolerance
    print(f"exported {path.name} (step {step}) to {out} ({out.stat().st_size / 1e6:.1f} MB); checked on a batch "
          f"of {len(check_x)}: max |logit diff| = {diff:.3g} ({'ok' if ok else 'FAILED'}, tolerance "
          f"{args.tolerance:g})")
    return 0 if ok else 1


def quantize_run(args, cfg, info, model, path, step, out_dir: Path) -> int:
    """int8 model to out_dir/model.int8.pt (TorchScript), fp32 beside it for comparison; top-1 of both on
    the test split, file sizes, CPU latency; exit 1 when int8 loses more than --max-drop points."""
    from .data import load
    from .quantize import latency_ms, quantize, save_scripted, top1

    cfg.data.num_workers = 0
    splits = load(cfg.data)
    test = list(_cpu_batches(splits.test, info, cfg, 256))
    calibration, seen = [], 0
    for x, _ in _cpu_batches(splits.train, info, cfg, 64):
        calibration.append(x)
        seen += len(x)
        if seen >= args.calibration_samples:
            break
    qmodel, how = quantize(model, calibration)
    x = calibration[0]
    fp32_size = save_scripted(model, x, out_dir / "model.fp32.pt")
    int8_size = save_scripted(qmodel, x, out_dir / "model.int8.pt")
    fp32, int8 = top1(model, test), top1(qmodel, test)
    drop = 100 * (fp32 - int8)
    ok = drop <= args.max_drop
    print(f"quantized {path.name} (step {step}), {how}\n"
          f"  top-1 fp32 {fp32:.4f}, int8 {int8:.4f} (drop {drop:.2f} points, limit {args.max_drop:g}: "
          f"{'ok' if ok else 'FAILED'})\n"
          f"  size fp32 {fp32_size / 1e6:.2f} MB, int8 {int8_size / 1e6:.2f} MB ({fp32_size / int8_size:.1f}x smaller)\n"
          f"  CPU latency per batch of {len(x)}: fp32 {latency_ms(model, x):.2f} ms, int8 {latency_ms(qmodel, x):.2f} ms\n"
          f"  wrote {out_dir / 'model.int8.pt'} (TorchScript: torch.jit.load)")
    return 0 if ok else 1


def _cpu_batches(split, info, cfg, batch: int):
    """(normalised images, labels) on the CPU, in order: what the evaluation pipeline feeds the model."""
    from .data import EvalBatches
    from .env import DistEnv

    batches = EvalBatches(split, info, DistEnv(), cfg.data, batch, torch.device("cpu"),
                          resident=hasattr(split, "images"), seed=cfg.run.seed)
    try:
        yield from (b for b in batches if b is not None)
    finally:
        batches.close()


if __name__ == "__main__":
    sys.exit(main())
