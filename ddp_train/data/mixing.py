"""Batch mixing on the device (data.mixup_alpha, data.cutmix_alpha), on both data paths: the samples are
mixed in pairs, the (2k, 2k+1)-th samples of the global batch's order with each other, each with its own
lambda (timm's per-sample "elem" mode) and, for CutMix, its own box. When both are on, each sample picks
one at random. TrainBatches deals the global batch to the ranks two samples at a time (PAIR), so a pair
never straddles a rank or a micro-batch: the pairs, and so the mixed batch, are the same at every world
size and accumulation (a roll over the rank's micro-batch, as torchvision's MixUp/CutMix and timm pair
them, would pair other samples at each). Every draw comes from a generator keyed by (seed, epoch, sample
index), so a resume draws what the uninterrupted run drew. Targets become soft labels (lambda one-hot +
(1 - lambda) partner one-hot, summing to 1), which torch's cross-entropy takes, label smoothing included.

torchvision's MixUp/CutMix draw one lambda per batch from the global RNG; keying per sample needs the draws
here, and the mixing itself is the same arithmetic (CutMix's lambda is corrected to the box's area)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .augment import sample_seed

_STREAM = 0x6D697821  # keeps these draws apart from the other per-sample streams of the same key
PAIR = 2  # samples mixed together: consecutive in the global order, dealt to one rank together


class BatchMixer:
    def __init__(self, seed: int, num_classes: int, mixup_alpha: float, cutmix_alpha: float):
        self.seed, self.num_classes = seed ^ _STREAM, num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha

    def _draws(self, epoch: int, index: torch.Tensor, h: int, w: int):
        """Per sample: lambda, whether CutMix, and the box (y0, y1, x0, x1)."""
        lam, cut, boxes = [], [], []
        for i in index.tolist():
            rng = np.random.default_rng(sample_seed(self.seed, epoch, i))
            use_cut = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < 0.5)
            alpha = self.cutmix_alpha if use_cut else self.mixup_alpha
            value = float(rng.beta(alpha, alpha))
            box = (0, 0, 0, 0)
            if use_cut:  # a box of area (1 - lambda), centred at a uniform point, clipped to the image
                rh, rw = int(h * np.sqrt(1 - value)), int(w * np.sqrt(1 - value))
                cy, cx = int(rng.integers(h)), int(rng.integers(w))
                y0, y1 = max(cy - rh // 2, 0), min(cy + rh // 2, h)
                x0, x1 = max(cx - rw // 2, 0), min(cx + rw // 2, w)
                box = (y0, y1, x0, x1)
                value = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
            lam.append(value)
            cut.append(use_cut)
            boxes.append(box)
        return lam, cut, boxes

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int, index: torch.Tensor):
        n, _, h, w = x.shape
        lam, cut, boxes = self._draws(epoch, index, h, w)
        partner = torch.arange(n, device=x.device) ^ 1  # 0<->1, 2<->3, ...: the pairs of the global order
        lam_t = torch.tensor(lam, device=x.device, dtype=x.dtype)
        mixed = torch.empty_like(x)
        blend = ~torch.tensor(cut, device=x.device)
        view = lam_t.view(-1, 1, 1, 1)
        mixed[blend] = (view * x + (1 - view) * x[partner])[blend]
        for i in (j for j in range(n) if cut[j]):
            y0, y1, x0, x1 = boxes[i]
            mixed[i] = x[i]
            mixed[i, :, y0:y1, x0:x1] = x[partner[i], :, y0:y1, x0:x1]
        one_hot = F.one_hot(y, self.num_classes).to(torch.float32)
        lam_f = lam_t.float().view(-1, 1)
        return mixed, lam_f * one_hot + (1 - lam_f) * one_hot[partner]
