"""`ddp-train`: one front door. Checks the config (and that the global batch divides the world) in this
process, so a user mistake exits 2 before any worker starts, then execs torchrun or the engine.

  ddp-train [--nproc-per-node N] [--nnodes N --rdzv-endpoint HOST:PORT] [--max-restarts K] [CONFIG] [k=v ...]
  ddp-train verify-resume|compare|evaluate|export|predict|doctor ...   (= python -m ddp_train.<tool>)
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

TOOLS = {"verify-resume": "ddp_train.verify_resume", "compare": "ddp_train.compare", "evaluate": "ddp_train.evaluate",
         "export": "ddp_train.export", "predict": "ddp_train.predict", "doctor": "ddp_train.doctor"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddp-train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter,
                                add_help=False)
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--rdzv-endpoint", default=None)
    p.add_argument("--max-restarts", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        module = importlib.import_module(TOOLS[argv[0]])
        return module.main(argv[1:]) or 0
    known, rest = _parser().parse_known_args(argv)
    from . import env as envvars
    from .config import load_config, micro_batch_size
    from .config.argv import engine_command, split_argv
    from .errors import UserError, report
    from .usercode import check_paths

    cfg = None
    try:
        config_path, overrides, flags = split_argv(rest)
        if not flags:
            if known.nproc_per_node < 1 or known.nnodes < 1:
                raise UserError("--nproc-per-node and --nnodes must be >= 1")
            if known.nnodes > 1 and not known.rdzv_endpoint:
                raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the first node's address)")
            cfg = load_config(config_path, overrides)
            micro_batch_size(cfg, known.nproc_per_node * known.nnodes)
            check_paths(cfg)
    except UserError as e:
        return report("ddp-train", e)
    if flags:  # --help / --print-config: the engine answers in this process
        cmd = engine_command(rest)
    else:
        cmd = engine_command(rest, known.nproc_per_node, nnodes=known.nnodes, rdzv_endpoint=known.rdzv_endpoint,
                             max_restarts=known.max_restarts)
        # torchrun's own default is 30 s between forwarding SIGTERM and SIGKILL: too short for a large
        # preemption save. Its LaunchConfig reads this variable (an explicit setting wins).
        envvars.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(cfg.parallel.shutdown_timeout_s), overwrite=False)
    sys.stdout.flush()
    os.execv(sys.executable, cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
