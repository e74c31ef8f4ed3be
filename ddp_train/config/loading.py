"""YAML loading, dotted overrides, type checking and validation against the schema (schema.py).
Precedence: command-line overrides > YAML file > dataclass defaults. Torch-free."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..errors import ConfigError
from .schema import Config


# ----------------------------------------------------------------------------------------- loading
def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then `a.b=value` overrides; validated. Raises ConfigError."""
    return from_mapping(read_yaml(path) if path is not None else {}, overrides)


def from_mapping(raw: dict[str, Any], overrides: list[str] = ()) -> Config:
    """Defaults, then a nested mapping of sections (as YAML gives), then overrides; validated."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections (run:, data:, ...), got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    cfg = from_dict(Config, raw, prefix="")
    validate(cfg)
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (give a YAML file, e.g. configs/mnist_cnn.yaml)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {p}{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections (run:, data:, ...)")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key or key.startswith("-"):
        raise ConfigError(f"cannot read argument {item!r}: overrides look like key.sub=value")
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text  # an unparseable scalar is a string
    return key.strip(), value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = node[p] = {}
        node = child
    node[parts[-1]] = value


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}: the dotted keys overrides use."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def all_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema."""
    cls = cls or Config
    keys = []
    for f in dataclasses.fields(cls):
        t = _hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            keys += all_keys(t, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def describe_keys() -> list[tuple[str, str, Any, str]]:
    """(key, type name, default, description) for every leaf, for --help."""
    out = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            val = getattr(obj, f.name)
            if dataclasses.is_dataclass(val):
                walk(val, f"{prefix}{f.name}.")
            else:
                out.append((prefix + f.name, _type_name(_hints(type(obj))[f.name]), val, f.metadata.get("help", "")))

    walk(Config(), "")
    return out


# ------------------------------------------------------------------------------------ conversion
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            full = prefix + str(key)
            raise ConfigError(f"unknown config key '{full}'" + _closest_full(full))
        t = hints[key]
        if dataclasses.is_dataclass(t):
            kwargs[key] = from_dict(t, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = coerce(value, t, prefix + key)
    return cls(**kwargs)


def _closest_full(full: str) -> str:
    keys = all_keys()
    sections = [f.name for f in dataclasses.fields(Config)]
    match = difflib.get_close_matches(full, keys + sections, n=1, cutoff=0.6)
    if not match:  # e.g. 'lr' alone: compare with the last part of every key
        leaf = full.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        m = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        match = [by_leaf[m[0]]] if m else []
    return f"; did you mean '{match[0]}'?" if match else " (see --help for every key)"


def coerce(value: Any, t: Any, key: str) -> Any:
    """Check `value` against type annotation `t`; ints are accepted where floats are expected."""
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin in (Union, types.UnionType):
        errors = []
        for arm in args:
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return coerce(value, arm, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"'{key}' must be {_type_name(t)}, got {value!r}")
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and True in args):
            return value
        raise ConfigError(f"'{key}' must be one of {', '.join(map(str, args))}; got {value!r}")
    if origin is dict:  # a free mapping (model.kwargs, data.kwargs): keys are the user's, not the schema's
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping (in YAML, or {key}.name=value), got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                value = [value]  # tags=foo on the command line
            else:
                raise ConfigError(f"'{key}' must be a list, got {value!r}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if t is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' must be a number, got {value!r}")
    if t is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    return value


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return "mapping"
    return "null" if t is type(None) else getattr(t, "__name__", str(t))


# ------------------------------------------------------------------------------------ validation
def _require(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"'{key}' {what}, got {value!r}")


def validate(cfg: Config) -> None:
    """Range checks that the types cannot express. World-size checks live in run.py (need the world)."""
    t, o, s, c, d = cfg.train, cfg.optim, cfg.sched, cfg.checkpoint, cfg.data
    _require(t.epochs >= 1, "train.epochs", "must be >= 1", t.epochs)
    _require(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1 or null", t.max_steps)
    _require(t.global_batch_size >= 1, "train.global_batch_size", "must be >= 1", t.global_batch_size)
    _require(t.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1", t.grad_accum_steps)
    _require(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", "must be > 0 or null", t.grad_clip)
    _require(0 <= t.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)", t.label_smoothing)
    _require(t.label_smoothing == 0 or t.loss == "cross_entropy", "train.label_smoothing",
             f"applies to train.loss=cross_entropy only (train.loss={t.loss}: smooth inside your loss)",
             t.label_smoothing)
    _require(t.ema_decay is None or 0 < t.ema_decay < 1, "train.ema_decay", "must be in (0, 1) or null", t.ema_decay)
    es = t.early_stopping
    _require(es.patience is None or es.patience >= 1, "train.early_stopping.patience", "must be >= 1 or null",
             es.patience)
    _require(es.min_delta >= 0, "train.early_stopping.min_delta", "must be >= 0", es.min_delta)
    _require(d.mixup_alpha >= 0 and d.cutmix_alpha >= 0, "data.mixup_alpha", "and data.cutmix_alpha must be >= 0",
             (d.mixup_alpha, d.cutmix_alpha))
    _require(not (d.mixup_alpha or d.cutmix_alpha) or t.loss == "cross_entropy", "data.mixup_alpha",
             f"and data.cutmix_alpha make soft targets, which need train.loss=cross_entropy (not {t.loss})",
             (d.mixup_alpha, d.cutmix_alpha))
    _require(0 <= d.random_erasing <= 1, "data.random_erasing", "must be a probability in [0, 1]", d.random_erasing)
    _require(d.name == "imagefolder" or not (d.randaugment or d.random_erasing), "data.randaugment",
             "and data.random_erasing are per-sample image-folder transforms (data.name=imagefolder); in-memory "
             "datasets augment on the device (data.augment, mixup_alpha, cutmix_alpha)",
             (d.randaugment, d.random_erasing))
    _require(c.keep_best >= 0, "checkpoint.keep_best", "must be >= 0", c.keep_best)
    _require(c.preempt_vote_every_s >= 0, "checkpoint.preempt_vote_every_s", "must be >= 0 (0: every step)",
             c.preempt_vote_every_s)
    _require(d.num_classes is None or d.num_classes >= 2, "data.num_classes", "must be >= 2 or null",
             d.num_classes)
    _require(t.log_every_steps >= 1, "train.log_every_steps", "must be >= 1", t.log_every_steps)
    _require(t.eval_every_epochs >= 1, "train.eval_every_epochs", "must be >= 1", t.eval_every_epochs)
    _require(t.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1", t.eval_batch_size)
    _require(o.lr > 0, "optim.lr", "must be > 0", o.lr)
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay)
    _require(0 <= o.momentum < 1, "optim.momentum", "must be in [0, 1)", o.momentum)
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
             "must be two numbers in [0, 1)", o.betas)
    _require(not (o.nesterov and (o.name != "sgd" or o.momentum == 0)), "optim.nesterov",
             "needs optim.name=sgd and optim.momentum > 0", o.nesterov)
    _require(s.warmup_steps >= 0, "sched.warmup_steps", "must be >= 0", s.warmup_steps)
    _require(s.step_size_epochs >= 1, "sched.step_size_epochs", "must be >= 1", s.step_size_epochs)
    _require(0 < s.gamma <= 1, "sched.gamma", "must be in (0, 1]", s.gamma)
    _require(0 <= s.min_lr_ratio <= 1, "sched.min_lr_ratio", "must be in [0, 1]", s.min_lr_ratio)
    _require(0 < s.pct_start < 1, "sched.pct_start", "must be in (0, 1)", s.pct_start)
    _require(c.every_steps is None or c.every_steps >= 1, "checkpoint.every_steps", "must be >= 1 or null",
             c.every_steps)
    _require(c.every_epochs is None or c.every_epochs >= 1, "checkpoint.every_epochs",
             "must be >= 1 or null", c.every_epochs)
    _require(c.keep_last >= 1, "checkpoint.keep_last", "must be >= 1", c.keep_last)
    _require(d.num_workers == "auto" or d.num_workers >= 0, "data.num_workers", "must be >= 0 or auto",
             d.num_workers)
    _require(0 <= cfg.model.dropout < 1, "model.dropout", "must be in [0, 1)", cfg.model.dropout)
    # FSDP2 casts through MixedPrecisionPolicy; fp16 would also need a sharded gradient scaler.
    _require(not (cfg.parallel.strategy == "fsdp" and t.precision == "fp16"), "train.precision",
             "fp16 is not supported with parallel.strategy=fsdp; use bf16 (or fp32)", t.precision)
    p = cfg.parallel
    _require(p.hang_timeout_s >= 0, "parallel.hang_timeout_s", "must be >= 0 (0: off)", p.hang_timeout_s)
    _require(p.hang_timeout_s == 0 or p.hang_timeout_s >= 5, "parallel.hang_timeout_s",
             "must be at least 5 s (a heartbeat goes every few seconds), or 0 for off", p.hang_timeout_s)
    _require(t.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1", t.max_bad_steps)
    _require(t.peak_tflops is None or t.peak_tflops > 0, "train.peak_tflops", "must be > 0 or null", t.peak_tflops)
    _require(cfg.log.progress_every_s > 0, "log.progress_every_s", "must be > 0", cfg.log.progress_every_s)
    _require(cfg.log.straggler_factor > 1, "log.straggler_factor", "must be > 1", cfg.log.straggler_factor)
    pr = cfg.profile
    _require(pr.steps is None or (len(pr.steps) == 2 and 1 <= pr.steps[0] <= pr.steps[1]), "profile.steps",
             "must be [first, last] with 1 <= first <= last (e.g. profile.steps=[10,12]), or null", pr.steps)
    _require(all(r >= 0 for r in pr.ranks), "profile.ranks", "must be ranks >= 0", pr.ranks)
    if cfg.log.tensorboard:
        import importlib.util

        _require(importlib.util.find_spec("tensorboard") is not None, "log.tensorboard",
                 "needs the tensorboard package: pip install 'ddp_train[tensorboard]' (or set log.tensorboard=false)",
                 True)
    _require(p.timeout_s >= 1, "parallel.timeout_s", "must be >= 1", p.timeout_s)
    _require(p.init_timeout_s >= 1, "parallel.init_timeout_s", "must be >= 1", p.init_timeout_s)
    _require(p.shutdown_timeout_s >= 1, "parallel.shutdown_timeout_s", "must be >= 1", p.shutdown_timeout_s)
    _require(c.simulate_slow_save_s >= 0, "checkpoint.simulate_slow_save_s", "must be >= 0", c.simulate_slow_save_s)
    _require(d.synthetic_train_size >= 1 and d.synthetic_test_size >= 1, "data.synthetic_train_size",
             "and data.synthetic_test_size must be >= 1", (d.synthetic_train_size, d.synthetic_test_size))
    _require(len(d.synthetic_shape) == 3 and all(x >= 1 for x in d.synthetic_shape), "data.synthetic_shape",
             "must be [channels, height, width]", d.synthetic_shape)
    _require(d.image_size >= 8, "data.image_size", "must be >= 8", d.image_size)
    _require(d.resize_size is None or d.resize_size >= d.image_size, "data.resize_size",
             "must be >= data.image_size (or null)", d.resize_size)
    _require(d.synthetic_classes >= 2, "data.synthetic_classes", "must be >= 2", d.synthetic_classes)
    if cfg.run.name is not None:
        _require(cfg.run.name not in ("", ".", "..") and "/" not in cfg.run.name, "run.name",
                 "must be a plain directory name", cfg.run.name)
