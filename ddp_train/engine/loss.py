"""The training loss: cross-entropy (with train.label_smoothing) or the user's own `pkg.module:fn`,
called as fn(logits, targets) -> a scalar tensor. A user loss is tried once on a tiny batch when it is
built, so one that does not return a scalar fails with one line before training."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..errors import ConfigError
from ..usercode import resolve

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CrossEntropy:
    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)


def build_loss(cfg: TrainConfig, num_classes: int, fn: LossFn | None = None) -> LossFn:
    """`fn`: a loss the Python API was given instead of train.loss."""
    if fn is None and cfg.loss == "cross_entropy":
        return CrossEntropy(cfg.label_smoothing)
    where = cfg.loss if fn is None else getattr(fn, "__qualname__", "the loss")
    fn = fn or resolve(cfg.loss, "train.loss")
    logits = torch.zeros(2, num_classes, requires_grad=True)
    try:
        out = fn(logits, torch.zeros(2, dtype=torch.long))
    except Exception as e:
        raise ConfigError(f"train.loss={where} raised {type(e).__name__} on a batch of 2 "
                          f"(logits [2, {num_classes}], int64 targets [2]): {str(e).splitlines()[0][:200]}") from None
    if not (isinstance(out, torch.Tensor) and out.dim() == 0 and out.is_floating_point()):
        got = f"a tensor of shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"train.loss={where} returned {got}; it must return a scalar (0-dim) float tensor, e.g. "
                          "the batch mean")
    return fn
