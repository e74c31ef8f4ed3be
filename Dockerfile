# ddp_train in the official PyTorch CUDA runtime image (torch 2.9.0, torchvision, CUDA 12.8, cuDNN 9).
#   docker build -t ddp_train .
#   docker run --gpus all --ipc=host -v "$PWD/runs:/app/runs" ddp_train
# The default command trains the embedded default (seed CNN on the bundled MNIST digits) on every GPU,
# offline unless WANDB_API_KEY is passed in (-e WANDB_API_KEY).
FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WANDB_ERROR_REPORTING=false \
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT=110
# torchrun waits this long after forwarding SIGTERM before it SIGKILLs the workers (its default: 30 s).
# Stop containers with `docker stop -t 120` (docker's own default is 10 s) so a checkpoint can finish.

WORKDIR /app
# Dependencies first (torch/torchvision come with the base image and satisfy pyproject's bounds), so a
# code change does not reinstall them.
COPY pyproject.toml README.md ./
COPY ddp_train ./ddp_train
COPY launch ./launch
RUN python -m pip install . && python -c "import ddp_train, launch.slurm, torchvision, mlxtend"
COPY configs ./configs
COPY slurm ./slurm

# Run directories (checkpoints, metrics, W&B files): mount a host directory here.
VOLUME ["/app/runs"]
CMD ["torchrun", "--nproc_per_node=gpu", "-m", "ddp_train"]
