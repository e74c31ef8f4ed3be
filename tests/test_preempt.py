"""Preemption pacing (engine/preempt.py) in one process: how often the ranks vote on a signal, and that a
real signal is acted on at the first vote after it. The multi-process save-and-exit is in
tests/integration/test_resume.py."""
from __future__ import annotations

import os
import signal

from ddp_train.engine.preempt import MAX_VOTE_INTERVAL, Preemption


def votes(p: Preemption, steps: range) -> list[int]:
    return [s for s in steps if s % p.every == 0]


def test_votes_are_paced_by_the_step_time_and_preempt_vote_every_s():
    p = Preemption([])
    assert p.pace(0.02) == 12  # 0.25 s of 20 ms steps
    assert votes(p, range(1, 40)) == [12, 24, 36]
    assert Preemption([]).pace(1e-5) == MAX_VOTE_INTERVAL  # tiny steps: bounded in steps too
    assert Preemption([]).pace(2.0) == 1  # slow steps: every step
    assert Preemption([], vote_every_s=0).pace(0.001) == 1  # 0: every step, however fast


def test_a_real_signal_is_acted_on_at_the_next_vote_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGUSR1)
    p = Preemption(["SIGUSR1"], vote_every_s=0.1)
    try:
        p.pace(0.025)  # every 4 steps
        assert not p.due(4)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert p.requested and p.signal_name == "SIGUSR1"
        assert not p.due(5) and not p.due(6) and not p.due(7)  # no vote between the paced steps
        assert p.due(8)  # one process: the vote is the local flag
    finally:
        p.restore()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_simulated_preemption_needs_no_vote():
    p = Preemption([], simulate_at_step=7)
    p.pace(0.01)  # every 25 steps
    assert p.due(7) and p.signal_name == "simulated"
