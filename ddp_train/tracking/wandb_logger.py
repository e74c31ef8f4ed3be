"""Weights & Biases from rank 0. Offline is first-class: mode auto = online only when an API key is
configured; an online init that cannot reach the server falls back to offline with one warning; an
explicit WANDB_MODE wins. The run id lives in the run directory, so restarts and requeues continue the
same W&B run, and steps are the engine's global step (offline resume does not know the last step)."""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .. import env as envvars
from ..config import Config
from ..env import DistEnv
from .loggers import Logger

log = logging.getLogger("ddp_train")
ID_FILE = "wandb_id.txt"


def api_key_configured() -> bool:
    if envvars.getenv("WANDB_API_KEY"):
        return True
    netrc = Path(envvars.getenv("NETRC") or Path.home() / ".netrc")
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def resolve_mode(configured: str) -> str:
    env_mode = (envvars.getenv("WANDB_MODE") or "").strip().lower()
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode == "dryrun":
        return "offline"
    if configured == "auto":
        return "online" if api_key_configured() else "offline"
    return configured


def stable_run_id(run_dir: Path) -> str:
    path = run_dir / ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


def prepare_dirs(run_dir: Path) -> Path:
    """W&B writes under the run directory; a read-only directory makes wandb silently use /tmp, so
    check first and say so."""
    wandb_dir = run_dir / "wandb"
    try:
        for sub in ("", "data", "cache"):
            (wandb_dir / sub).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=wandb_dir):
            pass
    except OSError as e:
        log.warning("W&B: %s is not writable (%s); W&B files go to the system temp dir", wandb_dir, e.strerror)
        return Path(tempfile.gettempdir())
    for key, sub in (("WANDB_DIR", ""), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache")):
        envvars.setenv(key, str(wandb_dir / sub) if sub else str(run_dir))  # WANDB_DIR gets /wandb appended
    return wandb_dir


class WandbLogger(Logger):
    def __init__(self, cfg: Config, env: DistEnv, run_dir: Path):
        envvars.setenv("WANDB_ERROR_REPORTING", "false", overwrite=False)  # else a DNS wait at exit when offline
        envvars.setenv("WANDB_SILENT", "true", overwrite=False)
        self.cfg, self.env, self.run_dir = cfg, env, run_dir
        self.wcfg = cfg.log.wandb
        self.run = None
        self._starting: threading.Thread | None = None
        self.mode = resolve_mode(self.wcfg.mode)
        envvars.setenv("WANDB_MODE", self.mode)  # one source of truth; wandb rejects an empty WANDB_MODE
        if self.mode == "disabled":
            return
        prepare_dirs(run_dir)
        self.run_id = stable_run_id(run_dir)
        # wandb's import and init (its service process) take ~1.3 s: done on a thread while the run loads
        # its data and builds the model; every method waits for it first (bounded by init_timeout_s)
        self._starting = threading.Thread(target=self._start_safely, name="ddp_train-wandb-init", daemon=True)
        self._starting.start()

    def ready(self) -> None:
        self._ready()

    def _ready(self) -> None:
        if self._starting is not None:
            self._starting.join()
            self._starting = None

    def _start_safely(self) -> None:
        try:
            self._start()
        except BaseException as e:  # W&B must never end the run; on a thread it would only print a traceback
            log.warning("W&B could not start (%s: %s); continuing without W&B", type(e).__name__, e)
            self.run = None

    def _start(self) -> None:
        import wandb

        self.wandb = wandb
        start = time.perf_counter()
        wandb_dir = self.run_dir / "wandb"
        before = set(wandb_dir.glob("run-*"))
        try:
            self.run = self._init(self.mode)
        except Exception as e:
            if self.mode != "online":
                log.warning("W&B init failed (%s: %s); continuing without W&B", type(e).__name__, e)
                return
            log.warning("W&B online init failed after %.1f s (log.wandb.init_timeout_s=%s, %s); logging offline "
                        "instead: `wandb sync %s` later", time.perf_counter() - start, self.wcfg.init_timeout_s,
                        type(e).__name__, wandb_dir)
            self.mode = "offline"
            try:
                wandb.teardown()  # forget the half-started online run, or its id stays "in use"
            except Exception:
                pass
            for stale in set(wandb_dir.glob("run-*")) - before:  # its empty online folder: keep `wandb sync` clean
                shutil.rmtree(stale, ignore_errors=True)
            try:
                self.run = self._init("offline")
            except Exception as e2:
                log.warning("W&B offline init failed too (%s); continuing without W&B", e2)

    def _init(self, mode: str):
        envvars.setenv("WANDB_MODE", mode)
        w = self.wcfg
        settings = self.wandb.Settings(init_timeout=float(w.init_timeout_s))
        return self.wandb.init(project=w.project, entity=w.entity, group=w.group, job_type=w.job_type,
                               name=self.run_dir.name, tags=list(w.tags) or None, notes=w.notes,
                               id=self.run_id, resume="allow", mode=mode, dir=str(self.run_dir),
                               config=self.cfg.to_dict(), settings=settings)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._ready()
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._ready()
        if self.run is not None:
            for k, v in summary.items():
                scalar = isinstance(v, (int, float, str, bool)) or v is None
                if scalar or (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)):
                    self.run.summary[k] = v

    def log_checkpoint(self, path: Path, step: int) -> None:
        self._ready()
        if self.run is None or not self.wcfg.log_checkpoints:
            return
        try:
            art = self.wandb.Artifact(f"{self.run_id}-checkpoint", type="checkpoint", metadata={"step": step})
            art.add_reference(f"file://{Path(path).resolve()}", checksum=False)  # a reference, not a copy
            self.run.log_artifact(art, aliases=["latest", f"step-{step}"])
        except Exception as e:
            log.warning("W&B: could not log checkpoint artifact %s: %s", path, e)

    def log_profile(self, directory: Path) -> None:
        """The profiler's traces and tables as a `profile` artifact (copied: they are small)."""
        self._ready()
        if self.run is None:
            return
        try:
            art = self.wandb.Artifact(f"{self.run_id}-profile", type="profile")
            art.add_dir(str(directory))
            self.run.log_artifact(art)
        except Exception as e:
            log.warning("W&B: could not log the profile artifact %s: %s", directory, e)

    def finish(self, exit_code: int = 0) -> None:
        self._ready()
        if self.run is not None:
            start = time.perf_counter()
            self.run.finish(exit_code=exit_code)
            self.run = None
            log.debug("W&B finish took %.2f s", time.perf_counter() - start)
