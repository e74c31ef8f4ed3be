"""The config schema: nested dataclasses are the names, types, defaults and, beside each field, its
one-line description (printed by `python -m ddp_train --help`). Torch-free: launchers import it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


def opt(default: Any, help: str) -> Any:
    """A field with its description; mutable defaults (lists) are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class RunConfig:
    name: str | None = opt(None, "run directory name under run.root; null: <config>-<launch time or SLURM job "
                                 "id>, kept across restarts and requeues")
    root: str = opt("runs", "directory that holds the run directories")
    seed: int = opt(0, "drives model init, data order and per-sample augmentation (dropout adds the rank)")


@dataclass
class DataConfig:
    name: str = opt("mnist_mini", "mnist_mini | mnist | fashion_mnist | cifar10 | imagefolder | synthetic, or "
                                  "pkg.module:factory, called as factory(root=data.root, **data.kwargs)")
    kwargs: dict[str, Any] = opt({}, "keyword arguments of a data.name factory (data.kwargs.size=100)")
    num_classes: int | None = opt(None, "classes of a user dataset; null: len(train.classes), or the largest "
                                        "label + 1 of train.targets / a scan")
    root: str = opt("data", "where the dataset's files are (downloaded to, for torchvision datasets)")
    device_resident: bool | Literal["auto"] = opt("auto", "keep the whole split on the device as uint8 "
                                                          "(auto: when it fits)")
    num_workers: int | Literal["auto"] = opt("auto", "DataLoader worker processes per rank; auto: the rank's "
                                                     "share of the CPUs minus one, 1..8")
    pin_memory: bool = opt(True, "pinned host memory for batches copied to a GPU")
    augment: bool = opt(True, "random rotation/translation (+flips where they keep the label), on the device; "
                              "random crops + flips for image folders")
    download: bool = opt(True, "let rank 0 download torchvision datasets that are missing")
    synthetic_train_size: int = opt(4096, "synthetic: training samples")
    synthetic_test_size: int = opt(1024, "synthetic: test samples")
    synthetic_shape: list[int] = opt([1, 28, 28], "synthetic: [channels, height, width]")
    synthetic_classes: int = opt(10, "synthetic: number of classes")
    image_size: int = opt(224, "imagefolder: RandomResizedCrop (train) / CenterCrop (eval) size")
    resize_size: int | None = opt(None, "imagefolder: eval Resize before the crop; null: image_size * 256 / 224")
    skip_corrupt: bool = opt(False, "imagefolder: skip and count unreadable images instead of stopping")
    mixup_alpha: float = opt(0.0, "mixup: mix each sample with another, lambda ~ Beta(alpha, alpha); 0: off")
    cutmix_alpha: float = opt(0.0, "CutMix: paste a box of another sample, area ~ Beta(alpha, alpha); 0: off")
    randaugment: bool = opt(False, "imagefolder: RandAugment in the per-sample training transforms")
    random_erasing: float = opt(0.0, "imagefolder: probability of erasing a random box of a training image")


@dataclass
class ModelConfig:
    name: str = opt("cnn_dropout", "mlp | cnn | cnn_dropout | resnet18/34/50 | efficientnet_b0..b3 | "
                                   "timm/<architecture> | pkg.module:factory (num_classes, in_channels, "
                                   "image_size, **model.kwargs)")
    kwargs: dict[str, Any] = opt({}, "keyword arguments of the model factory or timm model (model.kwargs.depth=4)")
    dropout: float = opt(0.5, "dropout probability (cnn_dropout, efficientnet_*)")
    pretrained: str | None = opt(None, "local weights to start from: a state_dict or .safetensors file (never "
                                       "downloaded)")


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = opt("adam", "the optimizer; built after the model is wrapped")
    lr: float = opt(1.0e-3, "base learning rate")
    weight_decay: float = opt(0.0, "weight decay on weights (not biases or norm scales)")
    momentum: float = opt(0.9, "momentum of sgd")
    nesterov: bool = opt(False, "sgd Nesterov momentum")
    betas: list[float] = opt([0.9, 0.999], "the betas of adam and adamw")
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = opt(
        "auto", "the optimizer's kernels: auto = fused where torch has them for the parameters (not FSDP's "
                "sharded ones), else torch's default; fused/foreach/for_loop force one")


@dataclass
class SchedConfig:
    name: Literal["constant", "step", "cosine", "onecycle"] = opt("cosine", "learning-rate schedule, per step")
    warmup_steps: int = opt(0, "linear warmup steps (constant, step, cosine)")
    step_size_epochs: int = opt(1, "step: decay every this many epochs")
    gamma: float = opt(0.7, "step: multiply the LR by this at each decay")
    min_lr_ratio: float = opt(0.0, "cosine: final LR = lr * min_lr_ratio")
    pct_start: float = opt(0.3, "onecycle: fraction of steps spent increasing the LR")


@dataclass
class EarlyStoppingConfig:
    metric: str = opt("val/top1", "the evaluation metric to watch (val/top1, val/loss, val_ema/top1, ...)")
    mode: Literal["max", "min"] = opt("max", "max: higher is better (accuracy); min: lower is better (loss)")
    patience: int | None = opt(None, "stop after this many evaluations without improvement; null: off")
    min_delta: float = opt(0.0, "an improvement must exceed this")


@dataclass
class TrainConfig:
    epochs: int = opt(12, "passes over the training split")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (overrides epochs)")
    global_batch_size: int = opt(64, "samples per optimizer step, over all ranks and accumulation steps")
    grad_accum_steps: int = opt(1, "micro-batches per optimizer step")
    precision: Literal["fp32", "bf16", "fp16"] = opt("fp32", "compute precision (autocast; GradScaler for fp16)")
    grad_clip: float | None = opt(None, "clip the global gradient norm to this (after unscaling)")
    loss: str = opt("cross_entropy", "cross_entropy, or pkg.module:fn called as fn(logits, targets) -> scalar")
    label_smoothing: float = opt(0.0, "cross-entropy label smoothing")
    compile: bool | Literal["default", "reduce-overhead", "max-autotune"] = opt(False, "torch.compile the wrapped model, in this mode")
    channels_last: bool | Literal["auto"] = opt(
        "auto", "channels_last memory format for model and batches; auto: on for 2-D convolutional models on "
                "the CPU (oneDNN's NHWC kernels), off on GPUs (not measured yet) and under FSDP")
    log_every_steps: int = opt(10, "log the mean training loss every this many steps")
    eval_every_epochs: int = opt(1, "evaluate on the test split every this many epochs (and at the end)")
    eval_batch_size: int = opt(1000, "per-rank evaluation batch size")
    deterministic: bool = opt(False, "deterministic algorithms; turns cudnn_benchmark and tf32 off")
    ema_decay: float | None = opt(None, "keep an exponential moving average of the weights with this decay "
                                        "(e.g. 0.999), evaluated as val_ema/*; null: off")
    early_stopping: EarlyStoppingConfig = section(EarlyStoppingConfig, "stop when a metric stops improving")
    cudnn_benchmark: bool = opt(True, "autotune convolution kernels (CUDA)")
    tf32: bool = opt(True, "TF32 matmuls/convolutions for fp32 on Ampere and newer")
    nan_guard: bool = opt(True, "skip steps whose global gradient norm is not finite (on the device with fused "
                                "kernels; else one host sync per step)")
    max_bad_steps: int = opt(10, "this many non-finite steps in a row: roll back to the newest checkpoint and "
                                 "skip those batches; a second time: stop with exit code 3")
    peak_tflops: float | None = opt(None, "the device's peak TFLOP/s for MFU; null: a table of known GPUs "
                                          "(dense bf16), none on CPU")


@dataclass
class ParallelConfig:
    strategy: Literal["ddp", "fsdp"] = opt("ddp", "DistributedDataParallel or FSDP2 (fully_shard)")
    backend: Literal["auto", "nccl", "gloo"] = opt("auto", "process-group backend; auto: nccl on GPUs, gloo on CPU")
    timeout_s: int = opt(600, "collective timeout once training is warm: a hung or dead rank ends the job")
    sync_bn: bool = opt(False, "BatchNorm statistics over the global batch (SyncBatchNorm) under DDP")
    hang_timeout_s: int = opt(300, "no training step for this long: dump every rank's stacks, write "
                                   "hang/report.txt and exit with code 4 (0: off)")
    init_timeout_s: int = opt(3600, "timeout while one rank works alone (data preparation, checkpoint writes) "
                                    "and before the first steps")
    shutdown_timeout_s: int = opt(120, "seconds torchrun gives workers between SIGTERM and SIGKILL (passed by "
                                       "ddp-train; plain torchrun: --shutdown-timeout)")


@dataclass
class CheckpointConfig:
    every_steps: int | None = opt(None, "save every this many optimizer steps")
    every_epochs: int | None = opt(1, "save every this many epochs")
    keep_last: int = opt(3, "keep this many newest checkpoints")
    keep_best: int = opt(0, "also keep this many best checkpoints by best_metric (never pruned by keep_last)")
    best_metric: str = opt("val/top1", "the metric keep_best ranks by (a loss: lower is better; else higher)")
    resume: str = opt("auto", "auto: the newest intact checkpoint of the run directory | never | PATH")
    preempt_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"]] = opt(
        ["SIGTERM", "SIGUSR1", "SIGUSR2"], "signals that request a save-and-exit (code 75) at the next step")
    preempt_vote_every_s: float = opt(0.25, "how often the ranks agree on a preemption signal, in seconds of "
                                            "training (a signal is acted on within about two votes); 0: every step")
    simulate_preempt_at_step: int | None = opt(None, "fault injection: act as if preempted after this step")
    simulate_slow_save_s: float = opt(0.0, "fault injection: a preemption save takes this much longer")


@dataclass
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = opt("auto", "auto: online with an API key, else "
                                                                          "offline")
    project: str = opt("ddp_train", "the W&B project")
    entity: str | None = opt(None, "W&B entity (team or user)")
    group: str | None = opt(None, "W&B group (sweeps set one)")
    job_type: str = opt("train", "W&B job type")
    tags: list[str] = opt([], "tags of the W&B run")
    notes: str | None = opt(None, "notes of the W&B run")
    init_timeout_s: int = opt(30, "give up on an online init after this and log offline")
    log_checkpoints: bool = opt(False, "log each checkpoint as an artifact (a reference, not a copy)")


@dataclass
class LogConfig:
    progress_bar: Literal["auto", "always", "never"] | bool = opt(
        "auto", "auto: a tqdm bar when rank 0's stdout is a terminal, else plain progress lines (files, SLURM "
                ".out); always | never (a bar regardless / plain lines only); true/false mean auto/never")
    progress_every_s: float = opt(30.0, "without a bar: one progress line (step/total, epoch, samples/s, loss, "
                                        "elapsed, ETA) every this many seconds, and one at each epoch end")
    console_metrics: Literal["short", "all"] = opt(
        "short", "rank 0's line per log interval: short (step, loss, top-1, lr, samples/s, data wait, MFU and "
                 "GPU memory where known, the slowest rank when a straggler) | all (every metric); metrics.jsonl, "
                 "W&B and TensorBoard get every metric either way")
    tensorboard: bool = opt(False, "also write the metrics as TensorBoard events under RUN_DIR/tb/")
    straggler_factor: float = opt(1.5, "warn once when one rank's own time per step (data wait + forward) is "
                                       "this many times the median rank's for 3 log intervals")
    wandb: WandbConfig = section(WandbConfig, "Weights & Biases, from rank 0")


@dataclass
class ProfileConfig:
    steps: list[int] | None = opt(None, "[first, last] optimizer steps to record with torch.profiler into "
                                        "RUN_DIR/profile/; null: off")
    ranks: list[int] = opt([0], "the ranks that record")
    record_shapes: bool = opt(False, "record input shapes (larger traces)")


@dataclass
class Config:
    run: RunConfig = section(RunConfig, "run directory and seed")
    data: DataConfig = section(DataConfig, "dataset and input pipeline")
    model: ModelConfig = section(ModelConfig, "model")
    optim: OptimConfig = section(OptimConfig, "optimizer")
    sched: SchedConfig = section(SchedConfig, "learning-rate schedule")
    train: TrainConfig = section(TrainConfig, "training loop")
    parallel: ParallelConfig = section(ParallelConfig, "distribution")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpoints, resume and preemption")
    log: LogConfig = section(LogConfig, "console and tracking")
    profile: ProfileConfig = section(ProfileConfig, "torch.profiler window")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
