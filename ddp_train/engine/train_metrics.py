"""The train/* and perf/* numbers of one log window, from the window's sums over all ranks (LossWindow's
packed tensor, all-reduced): arithmetic only, so it holds the same at any world size. Torch-free."""
from __future__ import annotations


def window_metrics(packed: list[float], steps: int, timed: int, world_size: int, global_batch: int,
                   seconds: float, wait_s: float, lr: float) -> dict:
    """packed = [sum of the ranks' loss means, correct, scored]. The loss is the mean of the global
    batches' losses. `timed`: the window's steps timed in this process (not those restored from a
    checkpoint)."""
    metrics: dict = {}
    if steps:  # every step of the window may have been skipped by the NaN guard
        metrics["train/loss"] = packed[0] / (steps * world_size)
    if packed[2]:  # not on mixed (soft-target) batches
        metrics["train/top1"] = packed[1] / packed[2]
    metrics.update({"train/lr": lr, "train/samples_per_s": timed * global_batch / max(seconds, 1e-9),
                    "train/step_time_s": seconds / max(timed, 1),
                    "train/data_wait_frac": min(1.0, wait_s / max(seconds, 1e-9))})
    return metrics


def perf_metrics(flops_per_sample: float, samples_per_s: float, world_size: int,
                 peak_tflops: float | None) -> dict:
    """TFLOP/s each device sustained over the window, and MFU where the device's peak is known."""
    tflops = flops_per_sample * samples_per_s / world_size / 1e12
    return {"perf/tflops_per_device": tflops, **({"perf/mfu": tflops / peak_tflops} if peak_tflops else {})}
