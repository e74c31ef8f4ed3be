"""`ddp-train`: one front door. Checks the config (and that the global batch divides the world) in this
process, so a user mistake exits 2 before any worker starts, then execs torchrun or the engine.

  ddp-train [--nproc-per-node N] [--nnodes N --rdzv-endpoint HOST:PORT] [--max-restarts K] [CONFIG] [k=v ...]
  ddp-train verify-resume|compare|evaluate|export|predict ...   (= python -m ddp_train.<tool>)
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

TOOLS = {"verify-resume": "ddp_train.verify_resume", "compare": "ddp_train.compare", "evaluate": "ddp_train.evaluate",
         "export": "ddp_train.export", "predict": "ddp_train.predict"}


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
    from .__main__ import split_argv
    from .config import load_config
    from .dist import DistEnv
    from .errors import USER_ERROR_EXIT, UserError
    from .run import micro_batch_size

    cfg = None
    try:
        config_path, overrides, flags = split_argv(rest)
        if not flags:
            if known.nproc_per_node < 1 or known.nnodes < 1:
                raise UserError("--nproc-per-node and --nnodes must be >= 1")
            if known.nnodes > 1 and not known.rdzv_endpoint:
                raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the first node's address)")
            cfg = load_config(config_path, overrides)
            micro_batch_size(cfg, DistEnv(world_size=known.nproc_per_node * known.nnodes))
    except UserError as e:
        print(f"ddp-train: error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT
    world = known.nproc_per_node * known.nnodes
    if world == 1 and known.max_restarts == 0 or flags:
        cmd = [sys.executable, "-m", "ddp_train", *rest]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={known.nproc_per_node}",
               f"--nnodes={known.nnodes}", f"--max-restarts={known.max_restarts}"]
        if known.rdzv_endpoint:
            cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={known.rdzv_endpoint}"]
        else:
            cmd += ["--standalone"]
        cmd += ["-m", "ddp_train", *rest]
        if cfg is not None:
            # torchrun's own default is 30 s between forwarding SIGTERM and SIGKILL: too short for a large
            # preemption save. Its LaunchConfig reads this variable (an explicit setting wins).
            os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(cfg.parallel.shutdown_timeout_s))
    sys.stdout.flush()
    os.execv(sys.executable, cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
