"""`--sweep key=v1,v2 --sweep key2=a,b` -> the cartesian product as override lists, one per array element."""
from __future__ import annotations

import itertools

from ddp_train.errors import ConfigError


def split_values(text: str) -> list[str]:
    """Split on commas that are not inside [...] or quotes, so a list value like [a,b] stays whole."""
    values, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += ch
    values.append(current)
    return [v.strip() for v in values]


def parse(specs: list[str]) -> list[tuple[str, list[str]]]:
    axes, seen = [], set()
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        values = split_values(text) if sep else []
        if not key or not values or any(v == "" for v in values):
            raise ConfigError(f"--sweep {spec!r}: write --sweep key=value1,value2 (e.g. --sweep optim.lr=1e-3,3e-4)")
        if key in seen:
            raise ConfigError(f"--sweep {key} is given twice: put all its values in one --sweep {key}=a,b,c")
        seen.add(key)
        axes.append((key, values))
    return axes


def expand(specs: list[str]) -> list[list[str]]:
    """[[]] without sweeps: one job with no extra overrides."""
    axes = parse(specs)
    if not axes:
        return [[]]
    keys = [k for k, _ in axes]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*(v for _, v in axes))]
