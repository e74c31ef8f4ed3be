"""`python -m ddp_train.predict RUN_DIR IMAGE... [--top-k 5] [--checkpoint PATH]`: the top-k classes of
each image with their probabilities, from the run's newest good checkpoint."""
from __future__ import annotations

import argparse
import sys

import torch

from .errors import UserError, report
from .rundir.trained import add_checkpoint_args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddp_train.predict", description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=5)
    add_checkpoint_args(p)
    args = p.parse_args(argv)
    try:
        from .rundir.trained import from_args, preprocess

        _, info, model, _, _ = from_args(args)
        batch = torch.stack([preprocess(path, info) for path in args.images])
        with torch.no_grad():
            probs = torch.softmax(model(batch).float(), dim=1)
        k = max(1, min(args.top_k, info.num_classes))
        names = info.class_names or [str(i) for i in range(info.num_classes)]
        for path, row in zip(args.images, probs):
            top = row.topk(k)
            print(path)
            for p_, i in zip(top.values.tolist(), top.indices.tolist()):
                print(f"  {names[i]:<20} {p_:.4f}")
        return 0
    except UserError as e:
        return report("ddp_train.predict", e)


if __name__ == "__main__":
    sys.exit(main())
