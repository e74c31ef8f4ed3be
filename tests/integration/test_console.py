"""The console as a user's `torchrun ... > run.log` leaves it: plain progress lines instead of a tqdm bar (no
carriage return), and a warning raised in forward on both ranks printed once, naming both; also under
torchrun's --redirects/--tee."""
from __future__ import annotations

import json
import re
import subprocess

import pytest
from conftest import CONFIGS, USER_ARGS, check, engine_env, free_port, read_jsonl, write_user_project

from ddp_train.config.argv import engine_command

pytestmark = pytest.mark.slow
MESSAGE = "quads: inputs look unnormalised"
# 512 samples / 32 = 16 steps an epoch, 3 epochs; a progress line every 0.2 s besides the epoch ends
ARGS = [str(CONFIGS / "cpu_smoke.yaml"), *USER_ARGS, "model.name=quads.nets:warning_cnn", "train.max_steps=null",
        "train.epochs=3", "train.log_every_steps=4", "log.progress_every_s=0.2"]
LINE = re.compile(r"^step (\d+)/48 \(\d+%\) \| epoch (\d)/3( done)? \| (\d+|\?) samples/s \| loss (\S+) \| "
                  r"elapsed \d+:\d\d:\d\d \| ETA (\d+:\d\d:\d\d|\?)$")


def launch(root, name, torchrun_args=(), stdout=None):
    cmd = engine_command([*ARGS, f"run.root={root / 'runs'}", f"run.name={name}"], 2, master_port=free_port(),
                         torchrun_args=list(torchrun_args))
    with open(root / f"{name}.out", "w") as out, open(root / f"{name}.err", "w") as err:
        proc = subprocess.run(cmd, cwd=root, env=engine_env(), stdout=out, stderr=err, timeout=300)
    proc.stdout, proc.stderr = (root / f"{name}.out").read_text(), (root / f"{name}.err").read_text()
    return check(proc)


@pytest.fixture(scope="module")
def to_file(tmp_path_factory):
    """The warning model on 2 processes, stdout and stderr to files, as `> run.log 2> err.log` does."""
    root = write_user_project(tmp_path_factory.mktemp("console"))
    return root, launch(root, "plain")


def test_stdout_to_a_file_has_plain_progress_lines_and_no_carriage_return(to_file):
    root, proc = to_file
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    parsed = [LINE.match(ln) for ln in lines]
    assert all(parsed), [ln for ln, m in zip(lines, parsed) if not m]
    ends = [(int(m[1]), int(m[2])) for m in parsed if m[3]]
    assert ends == [(16, 1), (32, 2), (48, 3)], lines  # one line at each epoch end, in the epoch it closes
    summary = json.loads((root / "runs" / "plain" / "summary.json").read_text())
    assert len(lines) <= 3 + summary["train_time_s"] / 0.2 + 2, lines  # the epoch ends + one per 0.2 s
    assert all(m[5] != "?" for m in parsed if int(m[1]) >= 4), lines  # the latest logged train/loss
    last_loss = [r["train/loss"] for r in read_jsonl(root / "runs" / "plain" / "metrics.jsonl") if "train/loss" in r][-1]
    assert parsed[-1][5] == f"{last_loss:.4g}", lines
    assert parsed[-1][6] == "0:00:00"


def test_a_warning_raised_on_both_ranks_is_printed_once_naming_both(to_file):
    root, proc = to_file
    hits = [ln for ln in (proc.stdout + proc.stderr).splitlines() if MESSAGE in ln]
    assert len(hits) == 1, hits
    assert re.fullmatch(rf"\[[^\]:]+:0,1\] UserWarning: {MESSAGE} \(nets\.py:\d+\)", hits[0]), hits
    assert MESSAGE in (root / "runs" / "plain" / "train.log").read_text()  # rank 0's console lines


def test_torchrun_redirects_and_tee_still_get_every_line(tmp_path):
    """--redirects 3 --tee 3: each rank's output in its own files under --log-dir, and on the console
    tagged by torchrun; the warning once, in rank 0's stdout; rank 1's files hold no warning."""
    write_user_project(tmp_path)
    proc = launch(tmp_path, "tee", ["--redirects", "3", "--tee", "3", "--log-dir", str(tmp_path / "logs")])
    hits = [ln for ln in (proc.stdout + proc.stderr).splitlines() if MESSAGE in ln]
    assert len(hits) == 1 and ":0,1] UserWarning" in hits[0], hits
    files = {p.relative_to(tmp_path / "logs").as_posix(): p.read_text() for p in (tmp_path / "logs").rglob("*.log")}
    rank0 = "".join(text for name, text in files.items() if re.search(r"/0/stdout\.log$", name))
    rank1 = "".join(text for name, text in files.items() if re.search(r"/1/std(out|err)\.log$", name))
    assert MESSAGE in rank0 and "step 48/48" in rank0 and "\r" not in rank0, files.keys()
    assert MESSAGE not in rank1, rank1
