"""ddp_train: a DDP-first PyTorch training engine and launcher."""
__version__ = "0.1.0"
