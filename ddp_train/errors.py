"""User mistakes get one clear line and exit code 2; everything else is a bug and keeps its traceback.
The exit codes are a contract with launchers and users (README, "Exit codes"). Torch-free."""
from __future__ import annotations

import difflib
import sys

USER_ERROR_EXIT = 2  # a mistake the user can fix, reported before training starts
PREEMPTED_EXIT = 75  # EX_TEMPFAIL, "try again later": the checkpoint is saved, requeue me
DIVERGED_EXIT = 3  # non-finite gradients again after a rollback: rerunning the same config will not help
HUNG_EXIT = 4  # no step completed within parallel.hang_timeout_s: hang/report.txt names the ranks behind


class UserError(Exception):
    """A problem the user can fix (config, paths, world size, data). Printed as one line, exit 2."""


class ConfigError(UserError):
    shared = True  # the config is the same on every rank, so is the error: rank 0 prints it


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass


def did_you_mean(name: str, candidates: list[str], what: str = "choose one of") -> str:
    """'; did you mean 'x'?' for the closest candidate, else '; <what> a, b, c'."""
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; {what} {', '.join(candidates)}"


def report(prog: str, e: UserError, rank: int = 0) -> int:
    """The one ending for a user mistake, in every command: `<prog>: error: <one line>` on stderr, exit 2.
    Under a launcher (rank = env.process_rank()) an error every rank raised alike (shared) is printed by
    rank 0 only; other ranks say who they are."""
    if rank == 0 or not getattr(e, "shared", False):
        prefix = f"[rank {rank}] " if rank else ""
        print(f"{prefix}{prog}: error: {e}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT
