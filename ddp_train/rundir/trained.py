"""A trained model back from its run directory (config.yaml, data_info.json, a checkpoint), and the eval
preprocessing of single image files: what evaluate, export and predict share."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from ..config import Config, load_config
from ..data.types import DataInfo
from ..errors import CheckpointError, UserError
from ..models import build_model
from . import checkpoints as ckpt


def add_checkpoint_args(parser) -> None:
    """--checkpoint / --best / --ema: which weights the evaluate, export and predict tools load."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", default=None, help="default: the newest intact checkpoint of the run")
    which.add_argument("--best", action="store_true", help="the checkpoint checkpoint.keep_best ranked best")
    parser.add_argument("--ema", action="store_true", help="the EMA weights (train.ema_decay) instead of the raw ones")


def from_args(args) -> tuple[Config, DataInfo, nn.Module, Path, int]:
    return load_trained(args.run_dir, args.checkpoint, best=args.best, ema=args.ema)


def load_trained(run_dir: str | Path, checkpoint: str | None = None, *, best: bool = False,
                 ema: bool = False) -> tuple[Config, DataInfo, nn.Module, Path, int]:
    """(config, data info, model in eval mode on CPU, checkpoint path, step). `best`: the checkpoint
    checkpoint.keep_best named best; `ema`: the moving average of the weights instead of the raw ones."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(str(run_dir / "config.yaml"), [])
    info_path = run_dir / "data_info.json"
    if not info_path.is_file():
        raise UserError(f"{info_path} is missing: the run was made by an older ddp_train; train again")
    meta = json.loads(info_path.read_text())
    for path in meta.get("code_paths", []):  # the user's modules, importable from wherever the tool runs
        if path not in sys.path:
            sys.path.append(path)
    info = DataInfo(meta["num_classes"], meta["in_channels"], tuple(meta["image_size"]), tuple(meta["mean"]),
                    tuple(meta["std"]), class_names=meta["class_names"])
    info.resize = meta.get("resize")  # type: ignore[attr-defined]
    if checkpoint:
        path = Path(checkpoint)
    elif best:
        path = ckpt.best_checkpoint(run_dir / "checkpoints")
    else:
        path = ckpt.newest_valid(run_dir / "checkpoints")
        if path is None:
            raise CheckpointError(f"{run_dir}/checkpoints holds no checkpoint; train first or pass --checkpoint")
    state = ckpt.read_checkpoint(path)
    cfg.model.pretrained = None  # the checkpoint has the weights; never read the pretrained file again
    model = build_model(cfg.model, info)
    weights = state["model"]
    if ema:
        weights = (state.get("modules") or {}).get("ema")
        if weights is None:
            raise CheckpointError(f"{path} holds no EMA weights: the run did not set train.ema_decay")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit model.name={cfg.model.name}: {str(e).splitlines()[0]}") from None
    model.eval()
    return cfg, info, model, path, int(state["extra"]["step"])


def preprocess(path: str | Path, info: DataInfo) -> torch.Tensor:
    """One image file -> a normalised [C, H, W] tensor, as the evaluation pipeline sees it."""
    from torchvision import transforms as T

    from ..data.imagefolder import open_image

    image = open_image(str(path), "L" if info.in_channels == 1 else "RGB")
    size = tuple(info.image_size)
    resize = getattr(info, "resize", None)
    steps = [T.Resize(resize), T.CenterCrop(size)] if resize else [T.Resize(size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(info.mean, info.std)])(image)
