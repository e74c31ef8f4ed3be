"""Exact distributed evaluation: every rank sums loss, top-1/top-5 hits, sample count and a confusion
matrix over its share; one all-reduce adds them up. No sample is padded or counted twice."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import dist
from .data import EvalBatches


@torch.no_grad()
def evaluate(model: nn.Module, batches: EvalBatches, num_classes: int, device: torch.device,
             autocast=None, dummy_input: torch.Tensor | None = None, on_batch=None) -> dict:
    """Returns loss, top1, top5 (fractions), count, and the confusion matrix [true, predicted].
    `model` should be the module without DDP (its forward may run a collective); an FSDP module is
    fine because every rank runs the same number of forwards (`None` batches run on a dummy)."""
    was_training = model.training
    model.eval()
    k5 = min(5, num_classes)
    # One float64 vector for the sums (exact up to 2^53) + the confusion matrix: a single all-reduce.
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
    for batch in batches:
        if batch is None:
            if dummy_input is not None:
                with autocast() if autocast else torch.no_grad():
                    model(dummy_input)
            continue
        x, y = batch
        with autocast() if autocast else torch.no_grad():
            logits = model(x)
        logits = logits.float()
        if on_batch is not None:  # e.g. evaluate's per-sample predictions
            on_batch(logits, y)
        sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
        topk = logits.topk(k5, dim=1).indices
        hit = topk == y.unsqueeze(1)
        sums[1] += hit[:, 0].sum()
        sums[2] += hit.any(dim=1).sum()
        sums[3] += len(y)
        confusion += torch.bincount(y * num_classes + topk[:, 0], minlength=num_classes ** 2).double()
    packed = dist.all_reduce_sum(torch.cat([sums, confusion]))
    sums, confusion = packed[:4].cpu(), packed[4:].cpu()
    model.train(was_training)
    count = int(sums[3].item())
    denom = max(count, 1)
    return {"loss": sums[0].item() / denom, "top1": sums[1].item() / denom, "top5": sums[2].item() / denom,
            "count": count, "confusion": confusion.long().view(num_classes, num_classes)}
