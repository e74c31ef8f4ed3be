"""The console's pieces without processes: the progress line and when it is printed, the rank tags, the
once-per-job aggregation of warnings (through a dict standing in for the job's TCPStore), and
setup_logging leaving the caller's logging and warnings as it found them."""
from __future__ import annotations

import io
import logging
import re
import threading
import warnings

from ddp_train.tracking.console import setup_logging
from ddp_train.tracking.loggers import ConsoleLogger
from ddp_train.tracking.progress import Progress, bar_mode, clock, progress_line
from ddp_train.tracking.warning_relay import Aggregator, WarningRelay, rank_list, tag

KEY = ("warning", "UserWarning", "inputs look unnormalised", "nets.py:12")


class FakeStore:
    """TCPStore's set/get/add on a dict (add on a missing key starts from 0); `broken` makes it fail."""

    def __init__(self):
        self.data: dict[str, int | str] = {}
        self.lock = threading.Lock()
        self.broken = False

    def _check(self):
        if self.broken:
            raise RuntimeError("store is gone")

    def set(self, key, value):
        self._check()
        with self.lock:
            self.data[key] = value

    def get(self, key):
        self._check()
        return self.data[key].encode()

    def add(self, key, n):
        self._check()
        with self.lock:
            self.data[key] = int(self.data.get(key, 0)) + n
            return self.data[key]


def test_progress_line_names_step_epoch_throughput_loss_elapsed_and_eta():
    assert progress_line(120, 744, 2, 12, 2034.4, 0.23412, 12.2, 65.0) == (
        "step 120/744 (16%) | epoch 2/12 | 2034 samples/s | loss 0.2341 | elapsed 0:00:12 | ETA 0:01:05")
    assert progress_line(62, 744, 1, 12, None, None, 0, None, epoch_end=True) == (
        "step 62/744 (8%) | epoch 1/12 done | ? samples/s | loss ? | elapsed 0:00:00 | ETA ?")
    assert clock(3723) == "1:02:03" and clock(float("nan")) == "?"


def test_without_a_terminal_lines_come_every_interval_and_at_each_epoch_end():
    t = [0.0]
    lines: list[str] = []
    bar = Progress("auto", total=20, every_s=1.0, samples_per_step=64, steps_per_epoch=10, stream=io.StringIO(),
                   now=lambda: t[0], emit=lines.append)
    assert bar.bar is None
    for step in range(1, 21):
        t[0] = step * 0.3  # 0.3 s a step: a line every ~4 steps, plus steps 10 and 20
        if step == 6:
            bar.saw({"train/loss": 1.5, "epoch": 0})
        bar.update(step=step, epoch=(step - 1) // 10, epoch_done=step % 10 == 0)
    steps = [int(re.match(r"step (\d+)/20", ln)[1]) for ln in lines]
    assert steps == [4, 8, 10, 14, 18, 20], lines
    assert lines[2].startswith("step 10/20 (50%) | epoch 1/2 done | 213 samples/s | loss 1.5 |"), lines[2]
    assert lines[-1].endswith("ETA 0:00:00") and "epoch 2/2 done" in lines[-1]
    assert "loss ?" in lines[0] and all("\r" not in ln for ln in lines)


# One log interval's metrics as the trainer logs them on 2 GPUs (the set that made a ~400-character line).
WINDOW = {"epoch": 3, "train/loss": 0.41234, "train/top1": 0.8712, "train/lr": 0.000853, "train/samples_per_s": 52311.4,
          "train/step_time_s": 0.00122, "train/data_wait_frac": 0.0312, "train/skipped_steps": 0,
          "perf/tflops_per_device": 311.2, "perf/mfu": 0.3147, "sys/slowest_rank": 1, "sys/slowest_host": "gpu-node-07",
          "sys/slowest_ratio": 1.21, "sys/slowest_data_wait_frac": 0.05, "sys/minor_faults_per_step": 0.0,
          "sys/peak_rss_growth_mb": 0.0, "sys/peak_gpu_mem_gb": 12.345, "gpu/rank0/util_pct": 97.0,
          "gpu/rank1/util_pct": 95.0}


def _console(metrics, mode="short", factor=1.5) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("ddp_train")
    old = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers[:], logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    try:
        ConsoleLogger(mode, factor).log_metrics(metrics, 120)
    finally:
        logger.handlers[:], logger.level, logger.propagate = old
    return out.getvalue().strip()


def test_the_console_line_is_short_and_log_console_metrics_all_gives_every_metric():
    short = _console(WINDOW)
    assert short == ("epoch 3 | step 120 | loss 0.4123 | top1 87.1% | lr 0.000853 | 52,311 samples/s | data wait 3.1% "
                     "| MFU 31.5% | GPU mem 12.3 GB"), short
    assert len(short) <= 130
    slow = _console({**WINDOW, "sys/slowest_ratio": 1.8, "train/skipped_steps": 2})  # over log.straggler_factor
    assert slow.endswith("| skipped 2 | slowest rank 1 (gpu-node-07) 1.8x"), slow
    assert "slowest" not in _console({**WINDOW, "sys/slowest_ratio": 1.8}, factor=2.0)
    cpu = {k: v for k, v in WINDOW.items() if not k.startswith(("perf/mfu", "sys/peak_gpu", "gpu/"))}
    assert "MFU" not in _console(cpu) and "GPU mem" not in _console(cpu)  # where unknown, left out
    full = _console(WINDOW, "all")
    assert full.startswith("epoch 3 | step 120 | train/loss 0.4123 | train/top1 0.8712")
    assert all(f"{k} " in full for k in WINDOW if k != "epoch") and len(full) > 350
    val = {"epoch": 3, "val/loss": 0.5, "val/top1": 0.86, "val/top5": 0.99, "val/count": 1000}
    assert _console(val) == _console(val, "all") == ("epoch 3 | step 120 | val/loss 0.5 | val/top1 0.86 | "
                                                      "val/top5 0.99 | val/count 1000")


def test_bar_modes():
    assert (bar_mode(True), bar_mode(False), bar_mode("always")) == ("auto", "never", "always")
    out = io.StringIO()
    assert Progress("always", 5, stream=out).bar is not None  # forced, even into a file
    assert Progress("never", 5, stream=out).bar is None
    quiet = Progress("auto", 5, enabled=False, stream=out, emit=lambda s: (_ for _ in ()).throw(AssertionError(s)))
    quiet.update(step=5, epoch=0, epoch_done=True)  # not rank 0: nothing at all
    assert quiet.bar is None


def test_rank_tags():
    assert rank_list([1, 0]) == "0,1" and rank_list([0, 1, 2, 3, 7]) == "0-3,7"
    assert tag({0: "n1", 1: "n1", 2: "n2"}) == "[n1:0,1 n2:2]"


def test_a_warning_waits_for_the_other_ranks_then_prints_once():
    agg = Aggregator(grace_s=2.0)
    agg.add(KEY, 1, "vm", t=0.0)
    assert agg.due(1.0) == []  # held: the other ranks raise it in the same step
    agg.add(KEY, 0, "vm", t=1.0)
    assert agg.due(2.5) == ["[vm:0,1] UserWarning: inputs look unnormalised (nets.py:12)"]
    agg.add(KEY, 0, "vm", t=3.0)
    assert agg.due(10.0) == [] and agg.due(10.0, final=True) == []
    agg.add(KEY, 2, "vm", t=11.0)  # a rank that raised it after the line went out: named at the end
    assert agg.due(12.0, final=True) == ["[vm:2] UserWarning: inputs look unnormalised (nets.py:12) "
                                         "(raised after it was reported)"]


def relays(world: int, store: FakeStore):
    main: list[str] = []
    local: dict[int, list[str]] = {r: [] for r in range(world)}
    out = [WarningRelay(r, world, "vm", store, emit_main=main.append, emit_local=local[r].append, poll_s=0.05,
                        grace_s=0.0, close_wait_s=0.5) for r in range(world)]
    # share one run prefix, as the ranks of one job do
    for r in out[1:]:
        r.prefix = out[0].prefix
    return out, main, local


def test_the_relay_prints_each_warning_once_naming_the_ranks_and_nothing_on_the_others():
    store = FakeStore()
    (r0, r1, r2), main, local = relays(3, store)
    log_key = ("log", "WARNING", "straggler: rank 2", "rank_stats.py:40")
    for relay in (r1, r2):
        relay.post(KEY)
        relay.post(KEY)  # once per rank
    r1.post(log_key)
    r0.post(KEY)
    r0._flush(final=False)  # what rank 0's thread does every poll_s
    for relay in (r2, r1):
        relay.close()  # rank 0 has read their posts: nothing printed here
    r0.close()
    assert main == ["[vm:0-2] UserWarning: inputs look unnormalised (nets.py:12)", "[vm:1] straggler: rank 2"]
    assert local == {0: [], 1: [], 2: []}


def test_rank_0_does_not_repeat_a_record_it_logged_itself():
    store = FakeStore()
    (r0, r1), main, local = relays(2, store)
    r0.agg.grace_s = 10.0
    key = ("log", "WARNING", "early stopping: no gain", "trainer.py:220")
    r0.note_local_log(key)
    r1.post(key)
    r0._flush(final=False)
    late = ("log", "WARNING", "straggler: rank 1", "rank_stats.py:113")
    r1.post(late)
    r0._flush(final=False)  # rank 1's copy arrived first, then rank 0 logged the same record
    r0.note_local_log(late)
    r1.close()
    r0.close()
    assert main == [] and local[1] == []


def test_without_rank_0_reading_a_rank_prints_its_own_and_a_broken_store_too():
    store = FakeStore()
    (_, r1), main, local = relays(2, store)
    r1.post(KEY)
    r1.close()  # rank 0 never read it (dead, or frozen): after close_wait_s, rank 1 prints it
    assert local[1] == ["[vm:1] UserWarning: inputs look unnormalised (nets.py:12)"]
    store2 = FakeStore()
    (_, r1b), _, local2 = relays(2, store2)
    store2.broken = True
    r1b.post(KEY)
    assert local2[1] == ["[vm:1] UserWarning: inputs look unnormalised (nets.py:12)"]
    r1b.close()
    assert len(local2[1]) == 1


def test_setup_logging_routes_python_warnings_and_restores_the_callers_logging():
    logger = logging.getLogger("ddp_train")
    keep = logging.Handler()
    logger.addHandler(keep)
    shown = warnings.showwarning
    store = FakeStore()
    try:
        restore = setup_logging(FakeEnv(1, 2), relay_store=store)
        assert warnings.showwarning is not shown
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("from rank 1", UserWarning, stacklevel=1)
        posted = [k for k, v in store.data.items() if k.endswith("w/1/1") and "from rank 1" in str(v)]
        assert len(posted) == 1, store.data
        store.add(posted[0][:-len("w/1/1")] + "ack/1", 1)  # rank 0 read it
        restore()
        assert warnings.showwarning is shown and logger.handlers == [keep]
        plain = setup_logging(True)
        assert warnings.showwarning is shown  # one process: Python's own warnings
        plain()
    finally:
        logger.removeHandler(keep)


class FakeEnv:
    def __init__(self, rank, world):
        self.rank, self.world_size = rank, world
        self.is_main, self.distributed = rank == 0, world > 1
