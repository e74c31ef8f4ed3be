"""The config: schema (dataclasses with descriptions), loading and validation, derived numbers and the
command line. Torch-free, so launchers and tools on a login node import it cheaply."""
from .derived import micro_batch_size, total_steps
from .loading import all_keys, describe_keys, flatten, load_config
from .schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    SchedConfig,
    TrainConfig,
    WandbConfig,
)

__all__ = ["Config", "RunConfig", "DataConfig", "ModelConfig", "OptimConfig", "SchedConfig", "TrainConfig",
           "ParallelConfig", "CheckpointConfig", "LogConfig", "WandbConfig", "load_config", "flatten", "all_keys",
           "describe_keys", "micro_batch_size", "total_steps"]
