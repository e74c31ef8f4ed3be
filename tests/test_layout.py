"""The package's shape, as users and maintainers rely on it: imports run one way (no module of ddp_train/
or launch/ imports another in a cycle, lazy imports included), and the login-node paths (the SLURM
launcher's --dry-run, compare) never import torch (7.5 s here, more on a busy login node)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import CONFIGS, ROOT, engine_env

PACKAGES = ("ddp_train", "launch")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str] = frozenset()) -> set[str]:
    """Every project module `path` imports, at the top or inside a function. `from pkg import sub` is an
    import of pkg.sub (and of pkg only for names that are not submodules)."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            subs = {f"{base}.{a.name}" for a in node.names} & modules
            found |= subs
            if len(subs) < len(node.names):
                found.add(base)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def test_no_import_cycles():
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    graph = {m: {i for i in imports(p, set(modules)) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not [c for c in cycles if len(set(c)) > 1 and not _through_own_init(c)], cycles


def _through_own_init(cycle: list[str]) -> bool:
    """pkg/__init__ -> pkg.sub -> pkg (a submodule importing a name its package re-exports) is how
    Python packages work, not a loop between modules."""
    return any(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(cycle, cycle[1:]))


def imported_modules(*args: str) -> set[str]:
    code = ("import runpy, sys; sys.argv = sys.argv[1:]\n"
            "try:\n    runpy.run_module(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('MODULES', ' '.join(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=engine_env(PATH="/usr/bin:/bin"),
                          capture_output=True, text=True, timeout=120)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES"))
    return set(line.split()[1:])


def test_the_slurm_launchers_dry_run_imports_no_torch(tmp_path):
    loaded = imported_modules("launch.slurm", str(CONFIGS / "cpu_smoke.yaml"), f"run.root={tmp_path}",
                              "--dry-run")
    assert "submitit" in loaded and "ddp_train.config" in loaded  # it did the real work
    assert not {m for m in loaded if m == "torch" or m.startswith("torch.")}


def test_compare_imports_no_torch(tmp_path):
    run = tmp_path / "a"
    run.mkdir()
    (run / "config.yaml").write_text("optim: {lr: 0.1}\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "val/top1": 0.5}\n')
    loaded = imported_modules("ddp_train.compare", str(run), "--plot", str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").is_file() and "ddp_train.config" in loaded
    assert not {m for m in loaded if m == "torch" or m.startswith("torch.")}


def test_a_run_imports_only_the_libraries_it_needs(tmp_path):
    """Start-up time: a run without W&B, ONNX, torchvision models or a sharded model loads none of
    wandb, onnx, torchvision, timm or torch.distributed.checkpoint (~1.1 s); matplotlib only for
    the plots at the end."""
    code = ("import sys; from ddp_train.__main__ import run_command\n"
            "code = run_command(sys.argv[1:])\n"
            "print('MODULES', code, ' '.join(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code, str(CONFIGS / "cpu_smoke.yaml"), f"run.root={tmp_path}",
                           "log.wandb.mode=disabled"], cwd=ROOT, env=engine_env(), capture_output=True, text=True,
                          timeout=120)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES")), None)
    assert line is not None, proc.stderr[-2000:]
    code, *loaded = line.split()[1:]
    assert code == "0" and "ddp_train.engine.trainer" in loaded
    heavy = {"wandb", "onnx", "onnxruntime", "torchvision", "torch.distributed.checkpoint", "timm"}
    assert not heavy & set(loaded), heavy & set(loaded)
