"""The doctor's checks one by one, on the numbers that decide them (fast, in this process), its table and
exit code, and that the checks the login node runs import no torch."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS, ROOT, engine_env

from ddp_train import doctor, doctor_checks, netcheck
from ddp_train.doctor_checks import FAIL, OK, WARN, Check
from ddp_train.errors import UserError

MB = 1 << 20


def test_a_dev_shm_smaller_than_the_workers_prefetched_batches_fails_with_the_bus_error_fix():
    # Docker's default: 64 MB; 8 ranks x 4 workers x 4 prefetched batches of 256 x 3x224x224 fp32 (~147 MB each)
    batch = 256 * (4 * 3 * 224 * 224 + 8)
    check = doctor_checks.shm(64 * MB, procs=8, workers=4, prefetch=4, batch_bytes=batch)
    assert check.status == FAIL and "Bus error" in check.fix and "--shm-size" in check.fix
    assert "8 ranks x 4 workers x 4 prefetched" in check.detail and "64.0 MB free" in check.detail
    assert doctor_checks.shm(3 * 8 * 4 * 4 * MB, 8, 4, 4, 2 * MB).status == WARN  # under 2x: little headroom
    assert doctor_checks.shm(1 << 40, 8, 4, 4, batch).status == OK
    assert doctor_checks.shm(64 * MB, 8, 0, 4, batch).status == OK  # no workers: /dev/shm is not used
    assert doctor_checks.shm(None, 1, 2, 4, batch).status == WARN  # no /dev/shm at all


def test_a_hostname_on_loopback_fails_only_for_several_nodes_and_names_gloo_socket_ifname():
    check = doctor_checks.hostname(2, None, "box", "127.0.1.1", "10.0.0.5", "10.0.0.5")
    assert check.status == FAIL and "loopback" in check.detail and "GLOO_SOCKET_IFNAME" in check.fix
    assert doctor_checks.hostname(2, None, "box", "127.0.1.1", None, None).status == FAIL  # master unknown
    assert doctor_checks.hostname(1, None, "box", "127.0.1.1", None, None).status == OK  # one node: fine
    assert doctor_checks.hostname(2, "eth0", "box", "127.0.1.1", "10.0.0.5", "10.0.0.5").status == OK
    assert doctor_checks.hostname(2, None, "box", "10.0.0.7", "10.0.0.5", "10.0.0.5").status == OK
    assert doctor_checks.hostname(2, None, "box", None, None, None).status == FAIL  # does not resolve


def test_an_unwritable_run_root_fails_and_names_the_setting(tmp_path):
    (tmp_path / "file").write_text("")  # a file where a directory should be: unwritable even for root
    check = doctor_checks.run_root(tmp_path / "file" / "runs")
    assert check.status == FAIL and "cannot write" in check.detail and check.fix == "choose a writable run.root"
    assert doctor_checks.run_root(tmp_path / "runs").status == OK


def test_free_disk_against_keep_last_checkpoints():
    """`free` is passed in: a full disk cannot be produced here (the real path, shutil.disk_usage, is
    what the ok case and the integration test use)."""
    ckpt = doctor_checks.checkpoint_bytes(100 * MB, MB, "adam", 0.9, ema=False)
    assert ckpt == 301 * MB  # weights + Adam's two moments + buffers
    assert doctor_checks.checkpoint_bytes(100 * MB, 0, "sgd", 0.0, ema=True) == 200 * MB
    check = doctor_checks.disk_space(Path("/runs"), 4, ckpt, free=1000 * MB)
    assert check.status == FAIL and "4 x 301.0 MB" in check.detail and "keep_last" in check.fix
    assert doctor_checks.disk_space(Path("/runs"), 4, ckpt, free=2000 * MB).status == WARN
    assert doctor_checks.disk_space(Path("/runs"), 4, ckpt, free=1 << 40).status == OK
    assert doctor_checks.disk_space(Path("/runs"), 4, None, free=MB).status == OK  # size unknown: just reported
    assert doctor_checks.free_bytes(Path("/nonexistent/deeper/runs")) > 0  # the nearest existing parent's


def test_the_login_node_sizes_checkpoints_from_a_previous_run_and_refuses_a_full_disk(tmp_path, monkeypatch):
    from ddp_train.config import load_config
    from launch import preflight

    cfg = load_config(str(CONFIGS / "cpu_smoke.yaml"), [f"run.root={tmp_path}"])
    assert preflight.check_disk(cfg, tmp_path) is None  # nothing written yet: only the free space
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    (tmp_path / "old" / "checkpoints" / "step_00000020.pt").write_bytes(b"x" * 1000)
    assert doctor_checks.measured_checkpoint_bytes(tmp_path)[0] == 1000
    monkeypatch.setattr(doctor_checks, "free_bytes", lambda path: 3000)  # a full disk, as above
    with pytest.raises(UserError, match=r"4 x 1000 B = 3.9 KB.*keep_last"):
        preflight.check_disk(cfg, tmp_path)


def test_a_port_in_use_warns_on_one_node_and_fails_for_several():
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        problem = netcheck.port_in_use(port)
        assert problem
        one, two = (doctor_checks.rendezvous_port(port, problem, n, 12345) for n in (1, 2))
    assert one.status == WARN and "--master_port=12345" in one.fix
    assert two.status == FAIL and "--rdzv-endpoint HOST:12345" in two.fix
    assert netcheck.port_in_use(port) is None
    assert doctor_checks.rendezvous_port(port, None, 2, 1).status == OK


def test_the_signal_delay_against_the_last_measured_save(tmp_path):
    def check(delay):
        known = doctor_checks.last_save_seconds(tmp_path, None)
        return doctor_checks.signal_delay(delay, f"{delay}s", lambda n: f"--signal-delay {n}", known)

    assert check(5).status == OK  # nothing measured yet
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text(json.dumps({"checkpoint_save_s": 30.0, "step_time_s": 5.0}))
    assert check(30).status == FAIL and check(30).fix == "use --signal-delay 100 or more"
    assert check(60).status == WARN and check(90).status == OK


def test_batches_per_rank_from_the_engines_sampler():
    from ddp_train.doctor_probe import steps_per_rank

    steps = steps_per_rank(1001, 3, micro=32, accum=4)  # 333 samples a rank -> 2 steps of 128 each
    assert steps == [2, 2, 2]
    check = doctor_checks.batches_per_rank(1001, 3, 32, 4, steps)
    assert check.status == WARN and "233 of 1001 samples left out" in check.detail  # 23%
    assert doctor_checks.batches_per_rank(4000, 2, 16, 1, steps_per_rank(4000, 2, 16, 1)).status == OK
    too_big = doctor_checks.batches_per_rank(100, 2, 64, 1, steps_per_rank(100, 2, 64, 1))
    assert too_big.status == FAIL and "global_batch_size" in too_big.fix
    assert doctor_checks.batches_per_rank(100, 2, 8, 1, [6, 5]).status == FAIL


def test_the_throughput_verdict_names_both_numbers():
    slow = doctor_checks.throughput(1200.4, 3400.0, "micro-batch 64", "more workers")
    assert slow.status == WARN and slow.detail.startswith("input-bound: loader 1200 samples/s vs model 3400")
    fast = doctor_checks.throughput(9000.0, 3400.0, "micro-batch 64", "more workers")
    assert fast.status == OK and fast.detail.startswith("compute-bound: loader 9000 samples/s vs model 3400")


def test_a_python_with_the_fork_deadlock_is_named_with_the_risk_and_the_fix():
    """CPython gh-112275 (the CI hang's cause, found with gdb): 3.11 before 3.11.8 and 3.10 before 3.10.15."""
    check = doctor_checks.python_fork((3, 11, 7))
    assert check.status == WARN and "Python 3.11.7 can deadlock in os.fork()" in check.detail
    assert "gh-112275" in check.detail and "DataLoader" in check.detail
    assert "Python >= 3.11.8" in check.fix and "forkserver" in check.fix
    assert doctor_checks.python_fork((3, 10, 12)).fix.startswith("Python >= 3.10.15")
    for fine in ((3, 11, 8), (3, 11, 11), (3, 12, 0), (3, 13, 1), (3, 10, 16)):
        assert doctor_checks.python_fork(fine).status == OK, fine
    here = [c for c in doctor.environment_checks(1) if c.name == "python"]  # the doctor asks about this Python
    assert here == [doctor_checks.python_fork(tuple(sys.version_info[:3]))]


def test_the_table_shows_the_fix_of_what_is_not_ok():
    text = doctor.table([Check("torch", OK, "2.x"), Check("disk", FAIL, "1 GB free", "free space")])
    lines = text.splitlines()
    assert lines[1].split() == ["ok", "torch", "2.x"] and lines[2].startswith("fail    disk")
    assert lines[3].strip() == "fix: free space" and lines[-1] == "doctor: 2 checks, 1 fail, 0 warn"


def test_a_config_mistake_is_one_line_and_exit_2(capsys):
    assert doctor.main([str(CONFIGS / "cpu_smoke.yaml"), "train.epoch=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ddp_train.doctor: error: unknown config key 'train.epoch'; did you mean 'train.epochs'?"


def test_the_login_node_checks_import_no_torch():
    code = ("import sys, ddp_train.doctor_checks, ddp_train.netcheck; "
            "print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=engine_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_gpus_against_processes_per_node(monkeypatch):
    """No GPU here: torch.cuda is stubbed to show 2 GPUs (the CPU branch runs for real below)."""
    import torch

    from ddp_train import doctor_probe

    if not torch.cuda.is_available():
        assert [(c.name, c.status) for c in doctor_probe.versions(1, "auto")] == [
            ("torch", OK), ("cuda", OK), ("nccl", OK), ("gpus", OK)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "H100")
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 21, 5))
    rows = {c.name: c for c in doctor_probe.versions(4, "auto")}
    assert rows["nccl"].detail == "NCCL 2.21.5"
    assert rows["gpus"].status == FAIL and rows["gpus"].fix.startswith("--nproc-per-node 2")
    assert {c.name: c for c in doctor_probe.versions(1, "auto")}["gpus"].status == WARN  # one GPU idle


def test_a_missing_dataset_fails_unless_rank_0_will_download_it(tmp_path):
    from ddp_train import doctor_probe
    from ddp_train.config import load_config

    def check(*overrides):
        return doctor_probe.dataset(load_config(None, ["data.name=mnist", f"data.root={tmp_path}", *overrides]))

    (later, none), (missing, _) = check(), check("data.download=false")
    assert none is None and later.status == WARN and "downloads it" in later.fix
    assert missing.status == FAIL and "data.root" in missing.fix
    assert not list(tmp_path.iterdir())  # the doctor downloaded nothing
