"""The run directory: its name (naming), the files a run leaves (files: summary, metrics, plots,
data_info), its checkpoint files (checkpoints) and the trained model read back from it (trained)."""
