"""`torchrun --nproc_per_node=N -m ddp_train [CONFIG.yaml] [key=value ...]` (or `python -m ddp_train` as
one process): parse argv -> load_config -> engine.run()."""
from __future__ import annotations

import sys


def run_command(argv: list[str], on_preempted=None) -> int:
    """The engine's command line as a function (what each SLURM task runs): the exit code, and a user
    mistake printed as one line."""
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

        return run(cfg, config_path, on_preempted)
    except UserError as e:
        return report("ddp_train", e, process_rank())


def main() -> None:
    from .allocator import fix_malloc_thresholds

    fix_malloc_thresholds()  # before torch's import makes the first large allocations
    from torch.distributed.elastic.multiprocessing.errors import record

    # @record: a crashing rank's traceback is written where torchrun shows it, and the job ends.
    sys.exit(record(run_command)(sys.argv[1:]))


if __name__ == "__main__":
    main()
