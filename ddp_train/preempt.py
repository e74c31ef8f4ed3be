"""Preemption signals only set a flag. The step loop reads it at the next step boundary, where all ranks
agree on it with one small all-reduce, save together and exit with PREEMPTED_EXIT."""
from __future__ import annotations

import signal
import threading

# EX_TEMPFAIL: "try again later". Launchers read it as "requeue me": the job saved a checkpoint.
PREEMPTED_EXIT = 75


class PreemptionFlag:
    def __init__(self, signal_names: list[str]):
        self.requested = False
        self.signal_name: str | None = None
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

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
