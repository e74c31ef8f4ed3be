"""Exact distributed evaluation: every rank sums loss, top-1/top-5 hits, sample count and a confusion
matrix over its share; one all-reduce adds them up. No sample is padded or counted twice."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import dist
from ..data import EvalBatches

# A dense C x C confusion matrix costs 8 C^2 bytes on every rank (21k classes: 3.5 GB); above this many
# classes only the per-class correct/total counts are kept (per-class accuracy still works).
MAX_CONFUSION_CLASSES = 1000


@torch.no_grad()
def evaluate(model: nn.Module, batches: EvalBatches, num_classes: int, device: torch.device,
             autocast=None, dummy_input: torch.Tensor | None = None, on_batch=None, loss_fn=None) -> dict:
    """Returns loss, top1, top5 (fractions), count, the confusion matrix [true, predicted] (None above
    MAX_CONFUSION_CLASSES) and per-class (correct, total). `model` should be the module without DDP (its
    forward may run a collective); an FSDP module is fine because every rank runs the same number of
    forwards (`None` batches run on a dummy). `loss_fn`: a user loss (a batch mean), summed weighted by
    the batch size; the default is plain cross-entropy, summed exactly. Everything accumulates on the
    device without a host sync (scatter_add, not bincount, which syncs to size its output); two
    all-reduces at the end."""
    was_training = model.training
    model.eval()
    k5 = min(5, num_classes)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    # int64 counts: top1, top5, count, then per-class correct and total, then the confusion matrix
    dense = num_classes <= MAX_CONFUSION_CLASSES
    counts = torch.zeros(3 + 2 * num_classes + (num_classes ** 2 if dense else 0), dtype=torch.int64,
                         device=device)
    correct, total = counts[3: 3 + num_classes], counts[3 + num_classes: 3 + 2 * num_classes]
    confusion = counts[3 + 2 * num_classes:]
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
        if loss_fn is None:
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        else:
            loss_sum += loss_fn(logits, y).double() * len(y)
        topk = logits.topk(k5, dim=1).indices
        hit = topk == y.unsqueeze(1)
        counts[0] += hit[:, 0].sum()
        counts[1] += hit.any(dim=1).sum()
        counts[2] += len(y)
        ones = torch.ones_like(y)
        correct.scatter_add_(0, y, hit[:, 0].long())
        total.scatter_add_(0, y, ones)
        if dense:
            confusion.scatter_add_(0, y * num_classes + topk[:, 0], ones)
    loss_sum = dist.all_reduce_sum(loss_sum).cpu()
    counts = dist.all_reduce_sum(counts).cpu()
    model.train(was_training)
    count = int(counts[2])
    denom = max(count, 1)
    return {"loss": loss_sum.item() / denom, "top1": counts[0].item() / denom, "top5": counts[1].item() / denom,
            "count": count, "per_class": (counts[3: 3 + num_classes], counts[3 + num_classes: 3 + 2 * num_classes]),
            "confusion": counts[3 + 2 * num_classes:].view(num_classes, num_classes) if dense else None}
