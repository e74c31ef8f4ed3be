"""How a rank ends once every rank knows the exit code (a config error every rank raised alike, a
divergence, a preemption). torchrun's agent, and srun with --kill-on-bad-exit, SIGTERM all ranks as soon
as the first one exits non-zero: a rank still printing the error, finishing W&B or closing the process
group would die of that signal (-15) instead, the job's failure report would disagree with itself, and a
rank that was to print the one line might never do so. Used by the command line only: the Python API's
caller keeps its own signal handlers. Torch-free."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

RANK_ZERO_GRACE_S = 30.0  # start-up skew between ranks is seconds (importing torch): ample


def hold_exit_code(code: int) -> None:
    """From now on a SIGTERM ends this process at once with `code`, after flushing what it printed,
    instead of killing it: the launcher's stop for the rest of a job that is ending anyway."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be installed from the main thread

    def _exit(signum, frame) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can be said
                pass
        os._exit(code)

    signal.signal(signal.SIGTERM, _exit)


def wait_for_rank_zero(code: int, timeout_s: float = RANK_ZERO_GRACE_S) -> None:
    """For a rank other than 0 with an error that rank 0 raises too and prints: rank 0's exit brings
    the launcher's SIGTERM, which ends this rank with the same code. Exiting first instead would get
    rank 0 killed before it printed the line. After timeout_s (no launcher stops us) it returns."""
    hold_exit_code(code)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
