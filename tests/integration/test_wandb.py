"""W&B tracking read back from the real offline files (`wandb leet inspect --json`), no network: one run
per job, history at every log step, summary equal to summary.json, config equal to config.yaml, the same
run id across a resume, the online->offline fallback, and `disabled` writing nothing. The W&B server is
the one thing mocked: an unreachable WANDB_BASE_URL stands in for "no network"."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import CONFIGS, ROOT, check, engine_env, free_port, read_jsonl, run_engine

from ddp_train.tracking.wandb_logger import resolve_mode

pytestmark = pytest.mark.slow
SMOKE = str(CONFIGS / "cpu_smoke.yaml")


def wandb_env(**extra) -> dict[str, str]:
    env = engine_env(**extra)
    if "WANDB_MODE" not in extra:
        env.pop("WANDB_MODE")  # engine_env turns W&B off; here the config decides
    return env


def inspect(run: object, summary: bool = False) -> list[dict]:
    cmd = [shutil.which("wandb") or "wandb", "leet", "inspect", "--json", *(["--summary"] if summary else []), str(run)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    return [json.loads(out)] if summary else [json.loads(line) for line in out.splitlines() if line.strip()]


def history(run) -> dict[int, dict]:
    rows = {}
    for rec in inspect(run):
        if rec.get("type") == "history":
            rows[rec["history"]["step"]["num"]] = rec["history"]["item"]
    return rows


def without_empty_mappings(d: dict) -> dict:
    """W&B does not store a key whose value is an empty mapping (model.kwargs: {})."""
    return {k: without_empty_mappings(v) if isinstance(v, dict) else v for k, v in d.items() if v != {}}


def test_two_process_job_is_one_offline_wandb_run_with_history_summary_and_config(runs):
    check(run_engine([SMOKE, f"run.root={runs}", "run.name=wb", "log.wandb.mode=offline",
                      "log.wandb.log_checkpoints=true", "log.wandb.tags=[ci,smoke]"], nproc=2, env=wandb_env()))
    run_dir = runs / "wb"
    [offline] = list((run_dir / "wandb").glob("offline-run-*"))  # one run, not one per rank
    assert not list((run_dir / "wandb").glob("run-*"))
    got = inspect(offline, summary=True)[0]
    assert (got["state"], got["exit_code"], got["step"]) == ("finished", 0, 20)
    assert got["run_id"] == (run_dir / "wandb_id.txt").read_text().strip() and got["name"] == "wb"
    assert got["tags"] == ["ci", "smoke"]
    assert got["config"] == without_empty_mappings(yaml.safe_load((run_dir / "config.yaml").read_text()))
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("val/top1", "val/top5", "val/loss", "best/val_top1", "world_size", "backend", "precision",
                "strategy", "git_sha", "samples_per_s", "wall_time_s", "data_wait_frac"):
        assert got["summary"].get(key) == summary[key], key  # W&B drops None (git_sha outside a git checkout)
    assert (summary["world_size"], summary["backend"]) == (2, "gloo")

    rows = history(offline)
    logged = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r}
    assert sorted(logged) == [5, 10, 15, 20]
    for step, record in logged.items():  # the global step is W&B's step, values identical
        assert rows[step]["train/loss"] == record["train/loss"]
        assert 0 <= rows[step]["train/data_wait_frac"] <= 1 and rows[step]["train/samples_per_s"] > 0
    assert rows[20]["val/top1"] == summary["val/top1"]
    artifacts = [r for r in inspect(offline) if r.get("type") == "artifact"]
    assert artifacts and "file://" in json.dumps(artifacts[0])  # the checkpoint, by reference


def test_resumed_job_continues_the_same_wandb_run_with_increasing_steps(runs):
    args = [SMOKE, f"run.root={runs}", "run.name=wb", "log.wandb.mode=offline"]
    check(run_engine([*args, "checkpoint.simulate_preempt_at_step=10"], env=wandb_env()), rc=75)
    check(run_engine(args, env=wandb_env()))
    attempts = sorted((runs / "wb" / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2
    first, second = (inspect(a, summary=True)[0] for a in attempts)
    assert first["run_id"] == second["run_id"] == (runs / "wb" / "wandb_id.txt").read_text().strip()
    assert first["exit_code"] == 75  # finish() ran on the preemption exit: nothing buffered was lost
    assert sorted(history(attempts[0])) == [5, 10]
    assert sorted(history(attempts[1])) == [15, 20]  # continues, does not restart at 0


def test_online_without_network_falls_back_to_offline_within_the_timeout(runs):
    env = wandb_env(WANDB_API_KEY="f" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{free_port()}")  # nothing listens
    proc = check(run_engine([SMOKE, f"run.root={runs}", "run.name=wb", "log.wandb.mode=online",
                             "log.wandb.init_timeout_s=5"], env=env))
    output = proc.stdout + proc.stderr
    warnings = [ln for ln in output.splitlines() if "W&B" in ln]
    assert len(warnings) == 1 and "W&B online init failed" in warnings[0], output
    seconds = float(warnings[0].split("failed after ")[1].split(" s")[0])
    assert seconds <= 5 + 3, warnings[0]  # the configured bound (+ process start slack), not wandb's ~100 s
    [offline] = list((runs / "wb" / "wandb").glob("offline-run-*"))
    assert inspect(offline, summary=True)[0]["state"] == "finished"
    assert not list((runs / "wb" / "wandb").glob("run-*"))  # the failed online attempt left nothing to sync


def test_explicit_wandb_mode_in_the_environment_wins(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("online") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"


@pytest.fixture(scope="module")
def two_lr_runs(tmp_path_factory):
    """Two runs that differ only in optim.lr, with W&B disabled by config (and not by the environment)."""
    root = tmp_path_factory.mktemp("compare") / "runs"
    for name, lr in (("lr_high", "1e-3"), ("lr_low", "3e-4")):
        check(run_engine([SMOKE, f"run.root={root}", f"run.name={name}", f"optim.lr={lr}",
                          "log.wandb.mode=disabled", "log.wandb.group=lrsweep"], env=wandb_env()))
    return root


def test_disabled_writes_nothing_for_wandb(two_lr_runs):
    for run in ("lr_high", "lr_low"):
        assert not (two_lr_runs / run / "wandb").exists() and not (two_lr_runs / run / "wandb_id.txt").exists()


def test_compare_prints_only_the_differing_key_and_both_accuracies_and_plots(two_lr_runs, tmp_path):
    png = tmp_path / "lr.png"
    proc = subprocess.run([sys.executable, "-m", "ddp_train.compare", str(two_lr_runs / "lr_high"),
                           str(two_lr_runs / "lr_low"), "--plot", str(png)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()[:3]
    assert header.split()[:3] == ["run", "optim.lr", "val/top1"]  # exactly one config column
    for run in ("lr_high", "lr_low"):
        summary = json.loads((two_lr_runs / run / "summary.json").read_text())
        row = next(r.split() for r in rows if r.startswith(run))
        assert float(row[2]) == pytest.approx(summary["val/top1"], abs=5e-5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # A glob and a W&B group name find the same two runs.
    for selector in ([str(two_lr_runs / "lr_*")], ["lrsweep", "--root", str(two_lr_runs)]):
        proc = subprocess.run([sys.executable, "-m", "ddp_train.compare", *selector, "--plot", str(png)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stdout.count("lr_") == 2, proc.stdout + proc.stderr


def test_compare_names_what_it_could_not_find(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ddp_train.compare", "no_such_group", "--root", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no_such_group" in proc.stderr
