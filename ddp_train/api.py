"""The Python API: `ddp_train.fit(config, model=..., data=..., loss=...)` for scripts and notebooks.

The same engine as the command line (run directory, checkpoints and exact resume, preemption, W&B): in a
notebook or `python my_train.py` it trains in-process at world size 1; under
`torchrun --nproc_per_node=8 my_train.py` every rank calls fit() and they train together. Pass objects
or import paths:

    model  a factory called as factory(num_classes=, in_channels=, image_size=) (a function or an
           nn.Module class taking those), or an nn.Module instance (rank 0's weights are copied to all)
    data   (train, test) datasets, or a factory called as factory(root=data.root, **data.kwargs)
    loss   fn(logits, targets) -> scalar tensor

config.yaml records each object's import path when it has one (a module-level function or class), so
evaluate/export/predict and requeues rebuild it; objects from a notebook are recorded by name only."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, load_config
from .config.loading import from_mapping
from .errors import ConfigError
from .usercode import OBJECT, name_for


@dataclass
class FitResult:
    run_dir: Path
    exit_code: int  # 0 done, 75 preempted (rerun the same call to continue from the checkpoint)
    _summary: dict | None = field(default=None, repr=False)

    @property
    def summary(self) -> dict:
        """summary.json: final metrics, throughput, versions (written by rank 0)."""
        if self._summary is None:
            path = self.run_dir / "summary.json"
            self._summary = json.loads(path.read_text()) if path.is_file() else {}
        return self._summary

    @property
    def metrics(self) -> list[dict]:
        from .rundir.files import read_metrics

        return read_metrics(self.run_dir)


def build_config(config: str | Path | dict | Config | None = None, overrides: list[str] = ()) -> Config:
    """A YAML path, a nested dict of sections, a Config, or None (defaults); then `a.b=value` overrides."""
    if config is None or isinstance(config, (str, Path)):
        return load_config(config, list(overrides))
    if isinstance(config, Config):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise ConfigError(f"config must be a YAML path, a dict of sections or a Config, got {type(config).__name__}")
    return from_mapping(config, list(overrides))


def fit(config: str | Path | dict | Config | None = None, *, model: Any = None, data: Any = None,
        loss: Any = None, overrides: list[str] = ()) -> FitResult:
    """Trains and returns where the run went. User mistakes raise ddp_train.errors.UserError (one line)."""
    from .engine.run import Components, execute

    cfg = build_config(config, overrides)
    if model is not None:  # an instance's constructor arguments are unknown: it cannot be rebuilt by path
        cfg.model.name = f"{OBJECT}:{_qualname(type(model))} instance" if _is_module(model) else name_for(model)
    if data is not None:
        cfg.data.name = name_for(data) if callable(data) and not isinstance(data, (tuple, list)) else \
            f"{OBJECT}:datasets passed to ddp_train.fit"
    if loss is not None:
        cfg.train.loss = name_for(loss)
    outcome = execute(cfg, config if isinstance(config, (str, Path)) else None,
                      components=Components(model=model, data=data, loss=loss))
    return FitResult(outcome.run_dir, outcome.exit_code)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_module(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)
