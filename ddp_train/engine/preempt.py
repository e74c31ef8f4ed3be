"""Preemption: signals only set a flag; at each step boundary every rank asks `due(step)`, which agrees on
the flag across ranks every few steps (an all-reduce on the CPU group about every
checkpoint.preempt_vote_every_s, 0.25 s by default, read at the next vote so its round trip overlaps the
steps between), and the ranks then save together and exit with PREEMPTED_EXIT. A simulated preemption
at a given step (verify_resume, tests) lives here too: every rank knows the step, so it needs no vote."""
from __future__ import annotations

import signal
import threading

from .. import dist

MAX_VOTE_INTERVAL = 64


class Preemption:
    def __init__(self, signal_names: list[str], simulate_at_step: int | None = None, vote_every_s: float = 0.25):
        self.requested = False
        # a signal is acted on within ~2 votes: 0.5 s by default, negligible against SLURM's signal delay
        self.vote_every_s = vote_every_s
        self.signal_name: str | None = None
        self.simulate_at_step = simulate_at_step
        self.every = 1  # vote every k optimizer steps; pace() sets k
        self._vote: dist.LaggedAnyRank | None = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for name in signal_names:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        # Nothing else here: no collective, no file write, no logging (not async-signal-safe).
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def pace(self, step_time_s: float) -> int:
        """Collective, once, at the same step on every rank: from now on vote every k steps, about
        vote_every_s apart at the slowest rank's pace (a vote per step costs a short step more than the
        all-reduce's round trip can hide). Returns k."""
        self.settle()
        slowest = max(dist.all_gather_object(step_time_s))
        self.every = max(1, min(MAX_VOTE_INTERVAL, int(self.vote_every_s / max(slowest, 1e-6))))
        return self.every

    def due(self, step: int) -> bool:
        """Collective: every rank calls it after every optimizer step; True on all ranks alike."""
        if step == self.simulate_at_step:
            self.requested, self.signal_name = True, "simulated"
            self.settle()
            return True
        if step % self.every:
            return False
        if self._vote is None:
            self._vote = dist.LaggedAnyRank()
        return self._vote.poll(self.requested)

    def settle(self) -> None:
        """Waits for the vote in flight: call before other collectives follow, or the loop ends."""
        if self._vote is not None:
            self._vote.drain()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
