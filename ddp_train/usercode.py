"""Users' own code by import path: `pkg.module:attribute` (model and dataset factories, losses). Resolving
one gives a one-line error that names the config key, the import that failed and the fix; the other
way, `import_path()` finds the path of an object the Python API was given, so config.yaml can record it
and every tool and requeue rebuilds the same objects. Torch-free."""
from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path
from typing import Any

from .errors import ConfigError

OBJECT = "<object>"  # the module part of the name recorded for an object that cannot be imported again


def name_for(obj) -> str:
    """What config.yaml records for an object given to the Python API: its import path when it has one."""
    return import_path(obj) or f"{OBJECT}:{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def is_import_path(name: str) -> bool:
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr)


def resolve(path: str, key: str) -> Any:
    """The object `path` names. `key` is the config key it came from (for the message)."""
    if not is_import_path(path):
        raise ConfigError(f"{key}={path!r} is not an import path: write it as package.module:attribute")
    module_name, _, attr = path.partition(":")
    if module_name == OBJECT:
        raise ConfigError(f"{key}={path}: the run was given this as a Python object (ddp_train.fit), which cannot "
                          "be imported again: give ddp_train.fit a module-level factory (or an import path) instead")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # the user's project, as `python -m` would see it
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        failed = getattr(e, "name", None) or module_name
        own = module_name == failed or module_name.startswith(failed + ".")  # the path itself, or a parent
        why = "it" if own else f"the module it imports, {failed!r},"
        raise ConfigError(f"{key}={path}: cannot import {module_name!r}: {why} was not found ({e}); run from the "
                          "directory that holds it or add that directory to PYTHONPATH") from None
    except Exception as e:  # the module itself raised while importing
        raise ConfigError(f"{key}={path}: importing {module_name!r} raised {type(e).__name__}: {_first_line(e)} "
                          f"({_where(e)})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            from .errors import did_you_mean

            raise ConfigError(f"{key}={path}: module {module_name!r} has no attribute {attr!r}"
                              + did_you_mean(attr, names, "it defines"))
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}={path}: {attr!r} is a {type(obj).__name__}, not a function or class")
    return obj


def check_paths(cfg) -> None:
    """Imports every user module the config names (not calling anything): a typo fails on the login node
    or in front of torchrun, not in every worker after a queue wait."""
    for key, value in (("model.name", cfg.model.name), ("data.name", cfg.data.name), ("train.loss", cfg.train.loss)):
        if is_import_path(value) and not value.startswith(OBJECT + ":"):
            resolve(value, key)


def call(fn, path: str, key: str, **kwargs) -> Any:
    """Calls a user factory; what it raises becomes one line naming the factory and its message."""
    try:
        return fn(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:
        if _raised_here(e):  # the call itself did not fit the signature
            raise ConfigError(f"{key}={path} cannot be called as {_signature(kwargs)}: {_first_line(e)}") from None
        raise ConfigError(f"{key}={path} raised TypeError: {_first_line(e)} ({_where(e)})") from None
    except Exception as e:
        raise ConfigError(f"{key}={path} raised {type(e).__name__}: {_first_line(e)} ({_where(e)})") from None


def import_path(obj: Any) -> str | None:
    """`module:qualname` when `obj` can be imported again by that path (not a lambda, a local function or
    something defined in __main__ or a notebook), else None."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    try:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}:{qualname}" if found is obj else None


def source_dir(path: str) -> str | None:
    """The sys.path entry the module of an import path was found in: recorded in the run directory so
    tools run from elsewhere can import it again."""
    module = sys.modules.get(path.partition(":")[0])
    file = getattr(module, "__file__", None)
    if not file:
        return None
    depth = path.partition(":")[0].count(".") + (1 if Path(file).name == "__init__.py" else 0)
    return str(Path(file).resolve().parents[depth])


def _signature(kwargs: dict) -> str:
    return "factory(" + ", ".join(f"{k}=..." for k in kwargs) + ")"


def _raised_here(e: TypeError) -> bool:
    return len(traceback.extract_tb(e.__traceback__)) <= 1


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _where(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno}"

