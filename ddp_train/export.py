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
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size at inference (ONNX)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--batch", type=int, default=4, help="batch used to trace and to check the export")
    p.add_argument("--tolerance", type=float, default=1e-4)
    args = p.parse_args(argv)
    try:
        from .rundir.trained import load_trained

        _, info, model, path, step = load_trained(args.run_dir, args.checkpoint)
    except UserError as e:
        return report("ddp_train.export", e)
    out_dir = Path(args.run_dir) / "export"
    out_dir.mkdir(exist_ok=True)
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


if __name__ == "__main__":
    sys.exit(main())
