"""ddp_train: a DDP-first PyTorch training engine and launcher.

    ddp_train.fit(config, model=..., data=..., loss=...)   the Python API (see ddp_train.api)
"""
__version__ = "0.1.0"


def fit(*args, **kwargs):
    """ddp_train.api.fit, imported on first use so `import ddp_train` stays light."""
    from .api import fit as _fit

    return _fit(*args, **kwargs)
