"""An exponential moving average of the weights (train.ema_decay), updated after every optimizer step and
evaluated beside the raw weights (val_ema/*). The average is torch.optim.swa_utils' EMA update
(get_ema_multi_avg_fn: a foreach lerp), applied to a copy of the model made before it is wrapped; under
FSDP the copy is sharded exactly like the model, so each rank averages its own shards and nothing is
gathered. Buffers (BatchNorm statistics) are averaged too, as timm's ModelEmaV3 does by default."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model)  # before DDP/FSDP wrap the original: `model` is still plain
        self.module.requires_grad_(False)
        self.updates = 0
        self._average = get_ema_multi_avg_fn(decay)

    def shard_like(self, shard) -> None:
        """FSDP: the same fully_shard plan as the model (call with the same function and arguments)."""
        shard(self.module)

    def _pairs(self, model: nn.Module):
        ema = [*self.module.parameters(), *(b for b in self.module.buffers() if b.is_floating_point())]
        live = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
        return [_local(e.detach()) for e in ema], [_local(p.detach()) for p in live]

    @torch.no_grad()
    def update(self, model: nn.Module, skipped: torch.Tensor | None = None) -> None:
        """`skipped`: the NaN guard's device flag (1.0: the optimizer step was skipped), so the average
        stays put on the device for a skipped step: a weight of 0 instead of 1 - decay, the same lerp."""
        ema, live = self._pairs(model)
        if skipped is None:
            self._average(ema, live, torch.tensor(self.updates))
        else:
            torch._foreach_lerp_(ema, live, (1.0 - skipped) * (1.0 - self.decay))
        for e, b in zip((b for b in self.module.buffers() if not b.is_floating_point()),
                        (b for b in model.buffers() if not b.is_floating_point())):
            e.copy_(b)  # counters (num_batches_tracked) follow the model
        self.updates += 1

    def state_dict(self) -> dict:
        return {"updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
