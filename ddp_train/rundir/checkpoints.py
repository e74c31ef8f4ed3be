"""Crash-safe checkpoint files: write to a temp file, fsync, rename; then a manifest (size + sha256) marks
the checkpoint complete. Loading verifies the manifest, uses torch.load(weights_only=True), and falls
back from a damaged newest checkpoint to the previous good one with a warning naming the file."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

log = logging.getLogger("ddp_train")

# Format 2: the engine's named states at the top level beside these keys, and "per_rank" (a list of each
# rank's named states). Format 1 (flat scheduler/scaler/progress, rng list, loss windows in extra) is
# upgraded on reading.
FORMAT_VERSION = 2
RESERVED_KEYS = {"format", "model", "optimizer", "config", "extra"}
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_checkpoint(directory: Path, step: int, state: dict[str, Any]) -> Path:
    """Writes step_XXXXXXXX.pt then its manifest step_XXXXXXXX.json. Raises OSError on failure, leaving
    every earlier checkpoint untouched."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / checkpoint_name(step)
    try:
        _atomic_write(path, lambda f: torch.save(state, f))
    except RuntimeError as e:  # torch's zip writer reports a failed write (full disk) as RuntimeError
        raise OSError(f"writing {path} failed: {str(e).splitlines()[0][:200]}") from e
    manifest = {"file": path.name, "step": step, "bytes": path.stat().st_size, "sha256": _sha256(path),
                "format": FORMAT_VERSION}
    _atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(manifest).encode()))
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, newest step first (complete or not)."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def verify(path: Path) -> str | None:
    """None when `path` is complete and intact, else the reason it is not."""
    manifest_path = path.with_suffix(".json")
    if not path.is_file():
        return "file missing"
    if not manifest_path.is_file():
        return "no manifest (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return "unreadable manifest"
    if path.stat().st_size != manifest.get("bytes"):
        return f"size {path.stat().st_size} != {manifest.get('bytes')} in the manifest (truncated)"
    if _sha256(path) != manifest.get("sha256"):
        return "checksum mismatch (corrupt)"
    return None


def newest_valid(directory: Path, before: int | None = None) -> Path | None:
    """The newest intact checkpoint (of a step < `before`, when given); warns for each damaged newer one.
    Raises when all are damaged."""
    candidates = [p for p in list_checkpoints(directory) if before is None or step_of(p) < before]
    for path in candidates:
        problem = verify(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is unusable (%s); falling back to the previous one", path, problem)
    if candidates:
        raise CheckpointError(f"every checkpoint in {directory} is damaged; nothing to resume from "
                              "(remove them or set checkpoint.resume=never to start over)")
    return None


def read_checkpoint(path: Path, expected: set[str] | None = None, mmap: bool = False,
                    optional: set[str] = frozenset()) -> dict[str, Any]:
    """torch.load(weights_only=True): a file that needs arbitrary unpickling is refused, nothing runs.
    `expected`: the top-level keys the reader will consume; a key missing or left over is an error naming
    it (a checkpoint of another layout must not half-load); `optional` ones may be missing. mmap=True pages tensors in only when used; the
    caller must copy what it keeps, or the file stays mapped after it is pruned."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:
        msg = str(e)
        if "weights_only" in msg or "Unsupported global" in msg or "Weights only load failed" in msg:
            first = next((ln.strip() for ln in msg.splitlines() if "Unsupported" in ln or "global" in ln), "")
            raise CheckpointError(f"refused to load {path}: it holds pickled objects beyond tensors and "
                                  f"plain containers, which could run code ({first[:160]})") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {msg.splitlines()[0][:200] if msg else ''}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a ddp_train checkpoint (top level is {type(state).__name__})")
    if state.get("format") == 1:
        state = _upgrade_from_1(state)
    expected = expected if expected is not None else RESERVED_KEYS
    missing = expected - state.keys() - set(optional)
    unexpected = state.keys() - expected if expected is not RESERVED_KEYS else set()
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match this version's checkpoint layout: "
                              f"missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}")
    return state


def _upgrade_from_1(state: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> 2: RNG states (with the augmentation generator inside) and loss windows move into
    per_rank; the W&B id (kept in wandb_id.txt) is dropped; the step is recorded in extra."""
    extra = dict(state.get("extra") or {})
    windows = extra.pop("loss_window", None) or []
    per_rank = []
    for i, rng in enumerate(state.get("rng") or []):
        rank = {"rng": {k: v for k, v in rng.items() if k != "augment"}}
        if "augment" in rng:
            rank["batches"] = {"augment": rng["augment"]}
        if i < len(windows):
            rank["loss_window"] = {"sum": windows[i][0], "steps": windows[i][1]}
        per_rank.append(rank)
    extra["step"] = (state.get("progress") or {}).get("step", 0)
    upgraded = {k: v for k, v in state.items() if k not in ("rng", "wandb_run_id", "extra")}
    return {**upgraded, "format": FORMAT_VERSION, "per_rank": per_rank, "extra": extra}


BEST_FILE = "best.json"  # written by the engine's keep_best: {"file", "step", "metric", "value", "kept"}


def best_checkpoint(directory: Path) -> Path:
    """The checkpoint checkpoint.keep_best names as the best; CheckpointError when there is none."""
    pointer = Path(directory) / BEST_FILE
    if not pointer.is_file():
        raise CheckpointError(f"{directory} has no {BEST_FILE}: the run did not set checkpoint.keep_best")
    return Path(directory) / json.loads(pointer.read_text())["file"]


def step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def prune(directory: Path, keep_last: int, protect: set[int] = frozenset()) -> None:
    """Keep the newest `keep_last` complete checkpoints and those at the `protect`ed steps (the best);
    drop older ones and stale temp files."""
    for tmp in directory.glob("*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    everything = list_checkpoints(directory)
    complete = [p for p in everything if p.with_suffix(".json").is_file()]
    for old in complete[keep_last:]:
        if step_of(old) in protect:
            continue
        old.with_suffix(".json").unlink(missing_ok=True)  # manifest first: never a manifest without data
        old.unlink(missing_ok=True)
    if complete:  # data files left without a manifest by a crash, older than a complete checkpoint
        newest = complete[0]
        for orphan in everything[everything.index(newest) + 1:]:
            if not orphan.with_suffix(".json").is_file():
                orphan.unlink(missing_ok=True)
    for sharded in directory.glob("step_*.dcp*"):  # FSDP shards: kept exactly as long as their .pt
        if sharded.suffix == ".tmp" or not sharded.with_suffix(".pt").is_file():
            shutil.rmtree(sharded, ignore_errors=True)
