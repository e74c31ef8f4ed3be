"""Each warning once per job, naming the ranks that raised it: `[vm:0,1] UserWarning: msg (model.py:12)`.

Every rank posts its warnings (Python `warnings`, and the "ddp_train" logger's WARNING records on ranks
other than 0) to the job's TCPStore through a client of its own; rank 0 reads them from a daemon thread
every `poll_s`, holds each new one for `grace_s` to collect the other ranks that raise it, and prints one
line. A collective per warning would deadlock (a warning is raised wherever the user's code is), so only the
store is used. Keys (under ddp_train/console/attempt_<restart>/run_<n>/):
  w/<rank>/<i>  the i-th distinct warning of that rank (JSON)      n/<rank>    how many it posted (add)
  posted        bumped on every post: rank 0 scans only when it moved  ack/<rank>  how many rank 0 has read
  done          ranks that closed their relay (rank 0 waits for them, bounded, before its last flush)
A rank whose store fails, or that warns after closing, prints its warnings itself, tagged [host:rank]; a
non-zero rank whose posts rank 0 has not read when it closes prints them itself too: nothing is lost."""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable

log = logging.getLogger("ddp_train")
_runs = 0  # relays started in this process: the same sequence on every rank, so their keys match


def rank_list(ranks: Iterable[int]) -> str:
    """[0, 1] -> '0,1'; [0, 1, 2, 3, 7] -> '0-3,7'."""
    out, rs = [], sorted(set(ranks))
    i = 0
    while i < len(rs):
        j = i
        while j + 1 < len(rs) and rs[j + 1] == rs[j] + 1:
            j += 1
        out.append(f"{rs[i]}-{rs[j]}" if j - i >= 2 else ",".join(map(str, rs[i:j + 1])))
        i = j + 1
    return ",".join(out)


def tag(where: dict[int, str]) -> str:
    """{rank: host} -> '[vm:0,1]' or '[n1:0-7 n2:8-15]' (hosts in order of their first rank)."""
    by_host: dict[str, list[int]] = {}
    for rank in sorted(where):
        by_host.setdefault(where[rank], []).append(rank)
    return "[" + " ".join(f"{h}:{rank_list(rs)}" for h, rs in by_host.items()) + "]"


def warning_text(kind: str, category: str, message: str, location: str) -> str:
    return f"{category}: {message} ({location})" if kind == "warning" else message


class Aggregator:
    """Rank 0's view: distinct warnings -> the ranks (and their hosts) that raised them. Pure: tested alone."""

    def __init__(self, grace_s: float = 2.0):
        self.grace_s = grace_s
        self.seen: dict[tuple, dict] = {}  # key -> {"first": t, "ranks": {rank: host}, "printed": set|None}
        self.local_logged: set[tuple] = set()  # rank 0's own log records: printed already, by rank 0

    def add(self, key: tuple, rank: int, host: str, t: float) -> None:
        if key in self.local_logged:
            return
        entry = self.seen.setdefault(key, {"first": t, "ranks": {}, "printed": None})
        entry["ranks"].setdefault(rank, host)

    def due(self, t: float, final: bool = False) -> list[str]:
        """Lines for the warnings held for grace_s (all of them when final); at the end one more line for
        the ranks that raised a warning after it was printed."""
        lines = []
        for key, e in self.seen.items():
            if key in self.local_logged:  # rank 0 logged it itself after another rank's copy arrived
                continue
            if e["printed"] is None and (final or t - e["first"] >= self.grace_s):
                lines.append(f"{tag(e['ranks'])} {warning_text(*key)}")
                e["printed"] = set(e["ranks"])
            elif final and e["printed"] is not None and set(e["ranks"]) - e["printed"]:
                late = {r: h for r, h in e["ranks"].items() if r not in e["printed"]}
                lines.append(f"{tag(late)} {warning_text(*key)} (raised after it was reported)")
                e["printed"] = set(e["ranks"])
        return lines


def location(filename: str, lineno: int) -> str:
    return f"{os.path.basename(filename)}:{lineno}"


class WarningRelay:
    def __init__(self, rank: int, world_size: int, host: str, store, emit_main: Callable[[str], None],
                 emit_local: Callable[[str], None], poll_s: float = 1.0, grace_s: float = 2.0,
                 close_wait_s: float = 3.0):
        global _runs
        _runs += 1
        self.rank, self.world, self.host = rank, world_size, host
        self.pid = os.getpid()
        self.store = store
        self.emit_main, self.emit_local = emit_main, emit_local
        self.poll_s, self.close_wait_s = poll_s, close_wait_s
        self.prefix = f"run_{_runs}/"
        self.agg = Aggregator(grace_s)
        self.lock = threading.Lock()
        self.posted: list[tuple] = []  # this rank's distinct warnings, in order (non-zero ranks: the store's w/)
        self.sent: set[tuple] = set()
        self.read = dict.fromkeys(range(1, world_size), 0)  # rank 0: entries read per rank
        self.posted_seen = 0
        self.closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._showwarning = None

    # -------------------------------------------------------------------------------------- set up
    def start(self) -> None:
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._hook
        if self.rank == 0:
            self._thread = threading.Thread(target=self._poll, name="ddp_train-warnings", daemon=True)
            self._thread.start()

    def _hook(self, message, category, filename, lineno, file=None, line=None) -> None:
        if file is not None:  # an explicit destination: not ours to reroute
            return self._showwarning(message, category, filename, lineno, file, line)
        self.post(("warning", category.__name__, str(message), location(filename, lineno)))

    def _key(self, name: str) -> str:
        return self.prefix + name

    # -------------------------------------------------------------------------------------- posting
    def post(self, key: tuple) -> None:
        """From any thread of this rank: a warning (kind, category, message, location)."""
        if os.getpid() != self.pid:  # a forked DataLoader worker: the store client is the parent's socket
            return self.emit_local(f"[{self.host}:{self.rank}] {warning_text(*key)}")
        with self.lock:
            if self.rank == 0 and not self.closed:
                self.agg.add(key, 0, self.host, time.monotonic())
                return
            if key in self.sent:
                return
            self.sent.add(key)
            if self.closed or self.store is None or not self._send(key):
                self.emit_local(f"[{self.host}:{self.rank}] {warning_text(*key)}")

    def _send(self, key: tuple) -> bool:
        i = len(self.posted) + 1
        try:
            self.store.set(self._key(f"w/{self.rank}/{i}"), json.dumps([*key, self.host]))
            self.store.add(self._key(f"n/{self.rank}"), 1)
            self.store.add(self._key("posted"), 1)
        except Exception:  # the store's host is gone or frozen: this rank prints its own from now on
            self.store = None
            return False
        self.posted.append(key)
        return True

    def note_local_log(self, key: tuple) -> None:
        """Rank 0 printed this log record itself: the same record from other ranks is not repeated."""
        with self.lock:
            self.agg.local_logged.add(key)

    # ---------------------------------------------------------------------------------- rank 0 side
    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        with self.lock:
            self._drain(force=final)
            lines = self.agg.due(time.monotonic(), final=final)
        for text in lines:
            self.emit_main(text)

    def _drain(self, force: bool) -> None:
        if self.store is None:
            return
        try:
            posted = int(self.store.add(self._key("posted"), 0))
            if posted == self.posted_seen and not force:
                return
            self.posted_seen = posted
            now = time.monotonic()
            for r in self.read:
                n = int(self.store.add(self._key(f"n/{r}"), 0))
                for i in range(self.read[r] + 1, n + 1):
                    kind, category, message, loc, host = json.loads(self.store.get(self._key(f"w/{r}/{i}")))
                    self.agg.add((kind, category, message, loc), r, host, now)
                if n > self.read[r]:
                    self.store.add(self._key(f"ack/{r}"), n - self.read[r])
                    self.read[r] = n
        except Exception:  # the store is gone: what the others posted since, they print themselves
            self.store = None

    # -------------------------------------------------------------------------------------- closing
    def close(self, wait: bool = True) -> None:
        """Before the process group goes. wait=False (an exception is on its way out): no waiting for the
        other ranks, what has arrived is printed."""
        if self.closed:
            return
        if warnings.showwarning == self._hook:
            warnings.showwarning = self._showwarning
        if self.rank == 0:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=5)
            if wait:
                self._wait_for(lambda: int(self.store.add(self._key("done"), 0)) >= self.world - 1)
            self._flush(final=True)
            with self.lock:
                self.closed = True
            return
        with self.lock:
            self.closed = True
            store, posted = self.store, list(self.posted)
        if store is None:
            return
        try:
            store.add(self._key("done"), 1)
        except Exception:
            pass
        acked = [0]

        def read_all() -> bool:
            acked[0] = int(store.add(self._key(f"ack/{self.rank}"), 0))
            return acked[0] >= len(posted)
        if posted and not self._wait_for(read_all, store):
            for key in posted[acked[0]:]:  # rank 0 never read them: print them here
                self.emit_local(f"[{self.host}:{self.rank}] {warning_text(*key)}")

    def _wait_for(self, condition, store=None) -> bool:
        if (store or self.store) is None:
            return False
        deadline = time.monotonic() + self.close_wait_s
        while True:
            try:
                if condition():
                    return True
            except Exception:
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def exception_in_flight() -> bool:
    """True inside a `finally` that an exception is passing through."""
    return sys.exc_info()[0] is not None
