"""Which config changes between a checkpoint and the run resuming from it alter the training trajectory.
The engine promises the same result at any world size, strategy, memory layout, kernel choice and loader
setting (up to fp32 reduction order), so those changes are worth no warning; a changed batch size, learning
rate, model, seed or schedule length (under a schedule that depends on it) is. Torch-free."""
from __future__ import annotations

from .loading import flatten

# Keys whose change keeps the trajectory: where and how the same steps run, and what is only recorded.
SAME_TRAJECTORY_PREFIXES = ("checkpoint.", "log.", "profile.", "parallel.timeout_s", "parallel.init_timeout_s",
                            "parallel.hang_timeout_s", "parallel.shutdown_timeout_s")
SAME_TRAJECTORY_KEYS = {
    "run.name", "run.root", "parallel.strategy", "parallel.backend", "data.num_workers", "data.pin_memory",
    "data.device_resident", "data.download", "model.pretrained",  # the checkpoint's weights replace the start
    "optim.implementation", "train.channels_last", "train.compile",
    "train.log_every_steps", "train.eval_every_epochs", "train.eval_batch_size", "train.nan_guard",
    "train.max_bad_steps", "train.peak_tflops", "train.cudnn_benchmark", "train.deterministic",
}
SCHEDULE_LENGTH_KEYS = {"train.epochs", "train.max_steps"}
LENGTH_DEPENDENT_SCHEDULES = {"cosine", "onecycle"}  # their LR at a step depends on the total steps
MICRO_BATCH_KEYS = {"train.grad_accum_steps"}  # the same global batch in other slices: BatchNorm sees them


def config_changes(old: dict, new: dict, batch_norm: bool = False) -> tuple[list[str], list[str]]:
    """(changed keys that alter the trajectory, changed keys that keep it), each sorted. `batch_norm`: the
    model normalises over the micro-batch, so its size (accumulation) is part of the trajectory."""
    a, b = flatten(old), flatten(new)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    decaying = {a.get("sched.name"), b.get("sched.name")} & LENGTH_DEPENDENT_SCHEDULES
    altering, keeping = [], []
    for key in changed:
        harmless = key in SAME_TRAJECTORY_KEYS or key.startswith(SAME_TRAJECTORY_PREFIXES) or (
            key in SCHEDULE_LENGTH_KEYS and not decaying) or (key in MICRO_BATCH_KEYS and not batch_norm)
        (keeping if harmless else altering).append(key)
    return altering, keeping
