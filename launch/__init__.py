"""Launchers that start ddp_train jobs: `python -m launch.slurm` submits to SLURM through submitit."""
