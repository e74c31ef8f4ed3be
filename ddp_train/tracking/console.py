"""The rank-aware console. Rank 0 prints its info lines (through tqdm.write, so they never tear a bar) and
train.log; every other rank prints only its warnings and errors, tagged `[host:rank]`, on stderr. Warnings
(Python `warnings` on every rank, the other ranks' WARNING records) go through the WarningRelay: one line
per distinct warning per job, naming the ranks that raised it. One process: plain logging and warnings.
Only sys.stdout/sys.stderr are written, so torchrun's --tee/--redirects see everything as before."""
from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

from tqdm.auto import tqdm

from .warning_relay import WarningRelay, exception_in_flight, location

log = logging.getLogger("ddp_train")
STORE_TIMEOUT_S = 10.0  # a frozen store costs a warning at most this long, then the rank prints its own


class _TqdmHandler(logging.StreamHandler):
    """Prints through tqdm.write so log lines do not tear the progress bar."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:
            self.handleError(record)


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (pytest's capture, a redirect), flushed per line."""

    def emit(self, record):
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def _record_key(record: logging.LogRecord) -> tuple:
    return ("log", record.levelname, record.getMessage(), location(record.pathname, record.lineno))


class _RelayedWarnings(logging.Handler):
    """Non-zero ranks: WARNING records to rank 0 through the relay (printed once, with the ranks); errors
    straight to stderr with the rank's tag. Rank 0: remembers its own warnings, so the same record from the
    other ranks is not printed again."""

    def __init__(self, relay: WarningRelay, errors: logging.Handler | None):
        super().__init__(logging.WARNING)
        self.relay, self.errors = relay, errors

    def emit(self, record):
        if getattr(record, "relayed", False):
            return
        if self.relay.rank == 0:
            self.relay.note_local_log(_record_key(record))
        elif record.levelno >= logging.ERROR:
            self.errors.handle(record)
        else:
            self.relay.post(_record_key(record))


def _env_fields(env) -> tuple[int, int]:
    if isinstance(env, bool):  # setup_logging(is_main) as before: one process's view
        return (0 if env else 1), (1 if env else 2)
    return env.rank, env.world_size


def setup_logging(env, log_file: Path | None = None, relay_store=None):
    """Points the "ddp_train" logger at the console (and train.log on rank 0) and, on several processes,
    routes warnings through the relay, which dist.teardown() flushes first, while the job's store is up.
    `env` is the DistEnv (or is_main). Returns a callable that puts the logger and warnings.showwarning back
    as they were (closing the relay if teardown did not) and closes the file: an in-process run
    (ddp_train.fit, a notebook, a test) leaves the caller's logging as it found it."""
    rank, world = _env_fields(env)
    host = socket.gethostname()
    logger = logging.getLogger("ddp_train")
    before = (list(logger.handlers), logger.propagate, logger.level)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    errors = None
    if rank == 0:
        console = _TqdmHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
        if log_file is not None:
            fh = logging.FileHandler(log_file)
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(fh)
    else:
        errors = _StderrHandler()
        errors.setFormatter(logging.Formatter(f"[{host}:{rank}] %(message)s"))
    relay = None
    if world > 1 and not isinstance(env, bool):
        store = relay_store
        if store is None:
            from ..dist import side_store

            store = side_store(env, STORE_TIMEOUT_S, name="console")
        relay = WarningRelay(rank, world, host, store, emit_main=_emit_main,
                             emit_local=_emit_local)
        relay.start()
        logger.addHandler(_RelayedWarnings(relay, errors))
        if relay_store is None:  # the job's store: flush while it is still up
            from ..dist import before_teardown

            before_teardown(lambda: relay.close(wait=not exception_in_flight()))
    elif errors is not None:  # a non-zero rank without a job to relay to
        logger.addHandler(errors)

    def restore() -> None:
        if relay is not None:
            relay.close(wait=not exception_in_flight())
        for handler in logger.handlers:
            handler.close()
        logger.handlers[:] = before[0]
        logger.propagate, logger.level = before[1], before[2]
    return restore


def _emit_main(text: str) -> None:
    log.warning(text, extra={"relayed": True})


def _emit_local(text: str) -> None:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except Exception:
        pass
