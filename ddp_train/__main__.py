"""`torchrun --nproc_per_node=N -m ddp_train [CONFIG.yaml] [key=value ...]` (or `python -m ddp_train` as
one process): parse argv -> load_config -> engine.run()."""
from __future__ import annotations

import sys


def run_command(argv: list[str], on_preempted=None) -> int:
    """The engine's command line as a function (what each SLURM task runs): the exit code, and a user
    mistake printed as one line."""
    from .ending import wait_for_rank_zero
    from .env import process_rank
    from .errors import UserError, report

    try:
        from .config.argv import print_help, split_argv

        config_path, overrides, flags = split_argv(argv)
        if "help" in flags:
            print_help()
            return 0
        from .config import load_config

        cfg = load_config(config_path, overrides)
        if "print-config" in flags:
            print(cfg.to_yaml(), end="")
            return 0
        from .engine.run import run

        return run(cfg, config_path, on_preempted, keep_exit_code=True)
    except UserError as e:
        rank = process_rank()
        code = report("ddp_train", e, rank)
        if rank != 0 and getattr(e, "shared", False):
            wait_for_rank_zero(code)  # rank 0 prints the line: it must not be stopped before it does
        return code


def main() -> None:
    from .allocator import fix_malloc_thresholds

    fix_malloc_thresholds()  # before torch's import makes the first large allocations
    from torch.distributed.elastic.multiprocessing.errors import record

    # @record: a crashing rank's traceback is written where torchrun shows it, and the job ends.
    exit_without_finalizing(record(run_command)(sys.argv[1:]))


def exit_without_finalizing(code: int) -> None:
    """Ends the process once the run has closed what it opened (loaders, process group, loggers): the
    atexit handlers still run (W&B, logging, multiprocessing), then os._exit skips Python's finalization,
    which with torch loaded takes 0.9-2.5 s (module teardown and the last garbage collection), paid by
    every rank at the end of every run."""
    import atexit
    import logging
    import os

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code if isinstance(code, int) else 1)


if __name__ == "__main__":
    main()
