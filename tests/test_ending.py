"""ddp_train.ending on a real process (torch-free, so cheap): the launcher's SIGTERM ends a rank that
already knows its exit code with that code, and a rank left waiting for rank 0 is not left forever."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

from conftest import engine_env

WAIT = ("import sys; from ddp_train.ending import wait_for_rank_zero; print('waiting', flush=True); "
        "wait_for_rank_zero(2, timeout_s={t}); print('gave up', flush=True); sys.exit(9)")


def test_sigterm_ends_a_waiting_rank_with_its_code_and_what_it_printed():
    proc = subprocess.Popen([sys.executable, "-c", WAIT.format(t=60)], stdout=subprocess.PIPE, text=True,
                            env=engine_env())
    assert proc.stdout.readline() == "waiting\n"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 2 and time.monotonic() - started < 5
    assert proc.stdout.read() == ""


def test_a_rank_nobody_stops_gives_up_waiting():
    proc = subprocess.run([sys.executable, "-c", WAIT.format(t=0.3)], capture_output=True, text=True,
                          env=engine_env(), timeout=30)
    assert proc.returncode == 9 and proc.stdout.splitlines() == ["waiting", "gave up"]
