"""Hang sentinel. The step loop only writes plain attributes (step, phase, time of the last progress):
no I/O, no sync. A daemon thread publishes them to the process group's store every few seconds and
watches this rank's own progress. When no step completed within parallel.hang_timeout_s (eval batches
and checkpoint saves count as progress; start-up, the first steps and saves get parallel.init_timeout_s),
every rank that can dumps its Python stacks to RUN_DIR/hang/rank<R>.txt, the lowest rank still
heartbeating writes RUN_DIR/hang/report.txt naming the ranks behind (a stopped or dead rank cannot dump
its stack, but its last heartbeat in the store still says where it was), and the process exits
HUNG_EXIT instead of waiting out the collective timeout. The heartbeats go through the store (served by
torchrun's agent, or rank 0) rather than files, so nodes need no shared filesystem to find each other."""
from __future__ import annotations

import faulthandler
import json
import logging
import multiprocessing
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

import torch

from ..data.batches import WORKER_STACKS_SIGNAL
from ..errors import HUNG_EXIT

log = logging.getLogger("ddp_train")
PATIENT_PHASES = ("start", "checkpoint")  # bounded by init_timeout_s: one rank may legitimately work alone


class HangSentinel:
    def __init__(self, rank: int, world_size: int, hang_dir: Path, timeout_s: float, init_timeout_s: float,
                 store=None, exit_fn=os._exit):
        self.rank, self.world, self.dir = rank, world_size, hang_dir
        self.timeout_s, self.init_timeout_s = float(timeout_s), float(max(init_timeout_s, timeout_s))
        self.interval = max(0.5, min(2.0, self.timeout_s / 10))  # heartbeats: one store write per interval
        self.store, self.exit_fn = store, exit_fn
        self.step, self.phase, self.warm = 0, "start", False
        self.progress_at = time.monotonic()
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ddp_train-hang-sentinel", daemon=True)

    # ---------------------------------------------------------------------- called by the step loop
    def start(self, step: int) -> None:
        self.step, self.progress_at = step, time.monotonic()
        self._publish()
        self._thread.start()

    def enter(self, phase: str) -> None:
        self.phase = phase

    def progressed(self, step: int | None = None) -> None:
        if step is not None:
            self.step = step
        self.progress_at = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval)

    # --------------------------------------------------------------------------------- the watcher
    def budget(self) -> float:
        return self.init_timeout_s if (self.phase in PATIENT_PHASES or not self.warm) else self.timeout_s

    def _record(self) -> dict:
        return {"rank": self.rank, "host": self.host, "pid": self.pid, "step": self.step, "phase": self.phase,
                "idle_s": round(time.monotonic() - self.progress_at, 1), "time": time.time(), "seq": self._seq}

    def _publish(self) -> None:
        self._seq += 1
        if self.store is not None:
            try:
                self.store.set(f"hb/{self.rank}", json.dumps(self._record()))
            except Exception:  # the store's host is gone or frozen: watch this rank alone from now on
                self.store = None

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._publish()
            idle = time.monotonic() - self.progress_at
            if idle > self.budget() and not self._stop.is_set():
                self._hung(idle)
                return

    def _hung(self, idle: float) -> None:
        budget = self.budget()
        log.error("hang: rank %d saw no training step for %.0f s (limit %.0f s, phase %s, last step %d); "
                  "stacks and report in %s, exiting with code %d", self.rank, idle, budget, self.phase,
                  self.step, self.dir, HUNG_EXIT)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._dump_stacks()
        self._set("hung", str(self.rank))
        records = self._read_all()
        alive = [r for r, rec in records.items() if rec is not None and _fresh(rec, self.interval)]
        if (not alive or min(alive) == self.rank) and self._first("report"):  # one report per hang
            self._wait_for([f"hung/{r}" for r in alive], 2 * self.interval + 1)  # their stacks are written
            records = self._read_all()
            (self.dir / "report.txt").write_text(report(records, self.interval, budget, self.dir, self.unread,
                                                        self.rank))
            self._set("report", "written")
        else:
            self._wait_for(["report"], 3 * self.interval + 5)
        for handler in logging.getLogger("ddp_train").handlers:
            handler.flush()
        for stream in (sys.stdout, sys.stderr):  # the console handler writes to stdout
            stream.flush()
        self.exit_fn(HUNG_EXIT)

    def _dump_stacks(self) -> None:
        path = self.dir / f"rank{self.rank}.txt"
        with open(path, "w") as f:
            f.write(f"rank {self.rank} on {self.host} (pid {self.pid}): step {self.step}, phase {self.phase}\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            workers = _signal_workers()
            if workers:
                f.write(f"\nDataLoader workers (pids {', '.join(map(str, workers))}) print their stacks to this "
                        f"rank's stderr\n")
        _dump_nccl_trace(self.dir / f"nccl_trace_rank{self.rank}.pkl")

    def _set(self, key: str, value: str) -> None:
        if self.store is not None:
            try:
                self.store.set(f"{key}/{self.rank}" if key == "hung" else key, value)
            except Exception:
                self.store = None

    def _first(self, key: str) -> bool:
        """True for the first rank to claim `key` (atomic: the store's counter), or without a store."""
        if self.store is None:
            return self.rank == 0 or self.world == 1
        try:
            return self.store.add(f"claim/{key}", 1) == 1
        except Exception:
            return True

    def _read_all(self) -> dict[int, dict | None]:
        """Every rank's last heartbeat: None where the store holds none; the ranks whose record could not be
        read (the store stopped answering) are kept in self.unread, so the report never calls them silent."""
        out: dict[int, dict | None] = {}
        self.unread: set[int] = set()
        for r in range(self.world):
            out[r] = self._record() if r == self.rank else None
            if r == self.rank:
                continue
            if self.store is None:
                self.unread.add(r)
                continue
            try:
                if self.store.check([f"hb/{r}"]):
                    out[r] = json.loads(self.store.get(f"hb/{r}"))
            except Exception:
                self.store = None
                self.unread.add(r)
        return out

    def _wait_for(self, keys: list[str], seconds: float) -> None:
        """Until every key exists in the store (or the time is up, or the store is gone)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.store is not None:
            try:
                if self.store.check(keys):
                    return
            except Exception:
                return
            time.sleep(0.2)


def _fresh(record: dict, interval: float) -> bool:
    return time.time() - record["time"] < 3 * interval + 2


def behind(records: dict[int, dict | None], interval: float) -> tuple[list[int], str]:
    """The ranks holding the others up, and why: silent ones first (stopped, dead or wedged so hard
    their heartbeat thread cannot run), then the lowest step, then the odd phase out."""
    silent = [r for r, rec in records.items() if rec is None or not _fresh(rec, interval)]
    if silent:
        return silent, "not responding: no heartbeat (the process is stopped, dead or frozen)"
    steps = {r: rec["step"] for r, rec in records.items()}
    low = min(steps.values())
    if len(set(steps.values())) > 1:
        return [r for r, s in steps.items() if s == low], f"behind the others at step {low}"
    phases = [rec["phase"] for rec in records.values()]
    common = max(set(phases), key=phases.count)
    odd = [r for r, rec in records.items() if rec["phase"] != common]
    if odd:
        return odd, f"in another phase than the rest (who wait in {common})"
    return sorted(records), f"every rank waits in phase {common} at step {low} (a collective some rank skipped?)"


STACKS_HEADER = re.compile(r"rank (\d+) on (\S+) \(pid (\d+)\): step (\d+), phase (\S+)")


def _from_stacks(rank: int, hang_dir: Path) -> dict | None:
    """A rank's whereabouts from the first line of the stacks it dumped (_dump_stacks), when its heartbeat
    is not in the store: it was alive at the hang, whatever the store says."""
    path = hang_dir / f"rank{rank}.txt"
    try:
        m = STACKS_HEADER.match(path.read_text().splitlines()[0])
        mtime = path.stat().st_mtime
    except (OSError, IndexError):
        return None
    if m is None:
        return None
    return {"rank": rank, "host": m[2], "pid": int(m[3]), "step": int(m[4]), "phase": m[5], "idle_s": None,
            "time": mtime, "from_stacks": True}


def _no_record(rank: int, unread, reporter: int | None) -> str:
    if rank in unread:
        by = f"rank {reporter}" if reporter is not None else "the reporting rank"
        return (f"behind: rank {rank}: its heartbeat could not be read (the store stopped answering {by}) and "
                f"it left no stacks file: its state is unknown")
    return (f"behind: rank {rank}: no heartbeat in the store and no stacks file (it died or froze before its "
            f"first heartbeat, or could not reach the store)")


def report(records: dict[int, dict | None], interval: float, budget: float, hang_dir: Path,
           unread=frozenset(), reporter: int | None = None) -> str:
    """The hang report. Each line says what the records show: a heartbeat in the store, the stacks a rank
    dumped (so it was alive), or nothing, and why nothing (never written, or the store did not answer)."""
    records = {r: rec if rec is not None else _from_stacks(r, hang_dir) for r, rec in records.items()}
    ranks, why = behind(records, interval)
    lines = [f"ddp_train hang report, {time.strftime('%Y-%m-%d %H:%M:%S')}: no training step completed within "
             f"{budget:.0f} s; the job exits with code {HUNG_EXIT}"]
    for r in ranks:
        rec = records[r]
        if rec is None:
            lines.append(_no_record(r, unread, reporter))
            continue
        seen = (f" (its heartbeat was not readable from the store; this is from the stacks it dumped, "
                f"rank{r}.txt)") if rec.get("from_stacks") else ""
        if not _fresh(rec, interval):  # its last word, up to one heartbeat interval old
            live = [x["step"] for x in records.values() if x is not None and _fresh(x, interval)]
            others = f"; the others wait after step {max(live)}" if live else ""
            lines.append(f"behind: rank {r} on {rec['host']} (pid {rec['pid']}): {why}; last heard "
                         f"{time.time() - rec['time']:.0f} s ago at step {rec['step']}, phase {rec['phase']}"
                         f"{others}{seen}")
        else:
            lines.append(f"behind: rank {r} on {rec['host']} (pid {rec['pid']}) at step {rec['step']}, phase "
                         f"{rec['phase']}: {why}{seen}")
    lines.append("")
    lines.append(f"{'rank':>4}  {'host':<20} {'pid':>8} {'step':>8}  {'phase':<18} {'idle s':>7} {'heard s ago':>11}  stacks")
    now = time.time()
    for r, rec in sorted(records.items()):
        if rec is None:
            heard = "unread" if r in unread else "never"
            lines.append(f"{r:>4}  {'?':<20} {'?':>8} {'?':>8}  {'?':<18} {'?':>7} {heard:>11}  -")
            continue
        stacks = hang_dir / f"rank{r}.txt"
        idle = "?" if rec["idle_s"] is None else f"{rec['idle_s']:.1f}"
        lines.append(f"{r:>4}  {rec['host']:<20} {rec['pid']:>8} {rec['step']:>8}  {rec['phase']:<18} "
                     f"{idle:>7} {now - rec['time']:>11.1f}  {stacks.name if stacks.exists() else '-'}")
    return "\n".join(lines) + "\n"


def _signal_workers() -> list[int]:
    """Asks this rank's DataLoader workers (its multiprocessing children) for their stacks: a rank waiting
    for a batch shows only the wait."""
    pids = []
    if WORKER_STACKS_SIGNAL is None:
        return pids
    for child in multiprocessing.active_children():
        try:
            os.kill(child.pid, WORKER_STACKS_SIGNAL)
            pids.append(child.pid)
        except (OSError, TypeError):  # gone meanwhile, or not started
            pass
    return pids


def _dump_nccl_trace(path: Path) -> None:
    """NCCL's flight recorder (TORCH_NCCL_TRACE_BUFFER_SIZE, set by dist.init on GPUs): the collectives
    each rank last entered, for torch's fr_trace analyser. Nothing on CPU."""
    if not torch.cuda.is_available():
        return
    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if dump is None:
        return
    try:
        path.write_bytes(dump())
    except Exception as e:
        log.info("NCCL flight recorder dump failed: %s", e)
