"""User mistakes get one clear line and exit code 2; everything else is a bug and keeps its traceback."""

import sys

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem the user can fix (config, paths, world size, data). Printed as one line, exit 2."""


class ConfigError(UserError):
    shared = True  # the config is the same on every rank, so is the error: rank 0 prints it


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass


def report(prog: str, e: UserError) -> int:
    """The command-line tools' ending for a user mistake: `<prog>: error: <one line>`, exit 2."""
    print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT
