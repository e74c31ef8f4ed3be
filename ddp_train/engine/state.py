"""The engine's stateful pieces, each owning its state through state_dict()/load_state_dict(), so the
checkpoint manager is handed a mapping of them and never reads the trainer: where training is
(TrainProgress), this rank's loss window (LossWindow) and this rank's random generators (RNGState)."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainProgress:
    """Optimizer steps done, the current epoch (0-based), and the steps done inside it: where a resumed
    run continues (the data order of an epoch is a function of its number, so this is the position)."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    world_sizes: list[list[int]] = field(default_factory=list)  # [[step, world size], ...] as they changed

    def note_world_size(self, world_size: int) -> None:
        if not self.world_sizes or self.world_sizes[-1][1] != world_size:
            self.world_sizes.append([self.step, world_size])

    def stepped(self) -> None:
        self.step += 1
        self.step_in_epoch += 1

    def epoch_done(self, steps_per_epoch: int) -> bool:
        return self.step_in_epoch >= steps_per_epoch

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.step_in_epoch = int(state["step"]), int(state["epoch"]), int(state["step_in_epoch"])
        self.world_sizes = [list(map(int, w)) for w in state.get("world_sizes", [])]


class LossWindow:
    """This rank's summed loss and top-1 hits over the steps since the last log, on the device (no host
    sync per step); the samples scored are counted on the host, where the batch size is known. Checkpoints
    carry it per rank, so the first loss logged after a resume averages the same steps as an uninterrupted
    run's. `untimed` counts restored steps, which the throughput of the window must skip."""

    def __init__(self, device: torch.device, rank: int = 0):
        self.sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)  # top-1 hits
        self.scored = 0  # samples with hard labels (mixup/CutMix batches score none)
        self.steps = 0
        self.untimed = 0
        self.rank = rank

    def add(self, loss: torch.Tensor, correct: torch.Tensor | None = None, scored: int = 0,
            skipped: torch.Tensor | None = None) -> None:
        """`skipped`: the NaN guard's device flag; a skipped step adds nothing to the sums (on the device),
        and unadd() takes it off the host counts once the flag is read."""
        if skipped is not None:
            keep = skipped == 0
            loss = torch.where(keep, loss, 0.0)
            correct = None if correct is None else torch.where(keep, correct, 0)
        self.sum += loss
        if correct is not None:
            self.correct += correct
        self.scored += scored
        self.steps += 1

    def unadd(self, scored: int) -> None:
        self.scored -= scored
        self.steps -= 1

    def packed(self) -> torch.Tensor:
        """[loss sum, hits, scored] as float64, for the log step's one all-reduce."""
        return torch.stack([self.sum.detach().double(), self.correct.double(),
                            torch.tensor(float(self.scored), dtype=torch.float64, device=self.sum.device)])

    def reset(self) -> None:
        self.sum.zero_()
        self.correct.zero_()
        self.scored = self.steps = self.untimed = 0

    def state_dict(self) -> dict[str, Any]:  # a sync, but only when saving
        return {"sum": self.sum.item(), "steps": self.steps, "hits": [self.correct.item(), self.scored]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sum.fill_(float(state["sum"]))
        self._set_hits(state.get("hits", [0, 0]))
        self.steps = self.untimed = int(state["steps"])

    def load_from_other_world(self, states: list[dict[str, Any]]) -> None:
        """Saved by another number of ranks: each rank takes the mean of their loss sums, so the first mean
        logged after the change (all ranks' sums over ranks x steps) is still the global mean; rank 0 takes
        all the hit counts (a ratio of sums)."""
        self.sum.fill_(sum(float(s["sum"]) for s in states) / len(states))
        hits = [sum(s.get("hits", [0, 0])[i] for s in states) for i in (0, 1)] if self.rank == 0 else [0, 0]
        self._set_hits(hits)
        self.steps = self.untimed = int(states[0]["steps"])

    def _set_hits(self, hits: list[int]) -> None:
        self.correct.fill_(int(hits[0]))
        self.scored = int(hits[1])


class RNGState:
    """This process's global generators: torch (CPU, and CUDA on a GPU), numpy, Python's random."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        _, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                           "has_gauss": int(has_gauss), "gauss": float(gauss)}}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(_tuples(state["python"]))
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
