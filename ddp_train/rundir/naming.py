"""Where a run lives: its directory's name (stable across torchrun restarts and SLURM requeues, and
predictable by the launcher) and the writable-directory check every writer shares. Torch-free."""
from __future__ import annotations

import time
from pathlib import Path

from .. import env as envvars
from ..config import Config
from ..errors import ConfigError


def default_run_name(config_path: str | None, launch: str | None) -> str:
    """<config stem>-<launch id>; the SLURM launcher predicts its jobs' directories with this too."""
    stem = Path(config_path).stem if config_path else "default"
    return f"{stem}-{launch or time.strftime('%Y%m%d-%H%M%S')}"


def ensure_writable(directory: Path, setting: str, what: str, shown: Path | None = None) -> None:
    """Creates `directory` and proves it writable with a probe file, or names the setting to change:
    "run.root=/x: cannot write the run directory /x/y (Permission denied); choose a writable run.root"."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".ddp_train_write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        key = setting.split("=")[0]
        raise ConfigError(f"{setting}: cannot write {what} {shown or directory} ({e.strerror}); choose a "
                          f"writable {key}") from None


def resolve_run_dir(cfg: Config, config_path: str | None) -> str:
    """Rank 0 names the run. Unnamed runs get <config>-<launch id>: SLURM's job id or the torchrun agent's
    start time, both kept across requeues/restarts, so those continue the same directory."""
    root = Path(cfg.run.root)
    name = cfg.run.name
    if name is None:
        launch = envvars.launch_id()
        name = default_run_name(config_path, launch)
        fresh = launch is None or (not launch.startswith("job") and envvars.restart_count() == 0)
        base, n = name, 1
        while fresh and (root / name).exists():  # two launches in the same second
            name, n = f"{base}-{n}", n + 1
    run_dir = root / name
    ensure_writable(run_dir / "checkpoints", f"run.root={cfg.run.root}", "the run directory", run_dir)
    return str(run_dir)
