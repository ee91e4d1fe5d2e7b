"""``roomcast serve --workers N``: N node processes sharing one port with SO_REUSEPORT.

The supervisor starts each worker as ``roomcast serve ... --workers 1 --reuse-port
--loop LOOP``, so every worker is a full node with its own node id, on the event loop
the supervisor resolved (``--loop auto`` is decided once, here); the kernel spreads new
connections across them. Workers die with the supervisor (Linux PR_SET_PDEATHSIG), even
when it is killed with SIGKILL. A worker that exits unexpectedly is replaced (with a
short backoff if it keeps crashing). SIGTERM or SIGINT is passed on to every worker,
which drains its clients (close 1001) and exits; the supervisor exits 0 once all have.

Metrics: the supervisor creates a private directory and passes it to every worker as
``PROMETHEUS_MULTIPROC_DIR``, so ``/metrics`` on any worker reports the totals of all
(see ``node.metrics``). An exited worker is marked dead there (its gauges stop
counting, its counters stay in the totals); the directory is removed on exit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Final

from roomcast.node.metrics import MULTIPROC_ENV, mark_worker_dead

log = logging.getLogger("roomcast.supervisor")

_POLL_SECONDS: Final = 0.2
_CRASH_WINDOW: Final = 5.0
_MAX_BACKOFF: Final = 5.0


_PR_SET_PDEATHSIG: Final = 1


def _load_prctl() -> Callable[[int, int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None or not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[[int, int], int] = ctypes.CDLL(name, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL: Final = _load_prctl()


def _die_with_supervisor() -> None:
    """In the worker, before exec: SIGTERM it if the supervisor dies, even by SIGKILL."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    """Keeps ``count`` worker processes running until told to stop."""

    def __init__(self, argv: Sequence[str], count: int, drain_seconds: float = 30.0,
                 *, loop: str | None = None) -> None:
        self._worker_argv = [sys.executable, "-m", "roomcast.node.cli", *argv,
                             "--workers", "1", "--reuse-port"]
        if loop is not None:
            self._worker_argv += ["--loop", loop]  # the last --loop wins
        self._loop = loop
        self._count = count
        self._drain_seconds = drain_seconds
        self._workers: dict[int, subprocess.Popen[bytes]] = {}
        self._started_at: dict[int, float] = {}
        self._crashes: dict[int, int] = {}
        self._stopping = False
        self._metrics_dir = ""

    def _spawn(self, slot: int) -> None:
        env = {**os.environ, MULTIPROC_ENV: self._metrics_dir}
        proc = subprocess.Popen(self._worker_argv, env=env, preexec_fn=_die_with_supervisor)
        self._workers[slot] = proc
        self._started_at[slot] = time.monotonic()
        log.info("worker %d started (pid %d)", slot, proc.pid)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: draining %d workers", signal.Signals(signum).name,
                 len(self._workers))
        self._stopping = True

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit status."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self._metrics_dir = tempfile.mkdtemp(prefix="roomcast-metrics-")
        log.info("workers share metrics through %s", self._metrics_dir)
        if self._loop is not None:
            log.info("workers run on the %s event loop", self._loop)
        try:
            return self._run()
        finally:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _run(self) -> int:
        for slot in range(self._count):
            self._spawn(slot)
        restart_at: dict[int, float] = {}
        while not self._stopping:
            time.sleep(_POLL_SECONDS)
            now = time.monotonic()
            for slot, proc in list(self._workers.items()):
                if self._stopping:
                    break  # a signal arrived during this pass: exits are expected now
                if slot in restart_at:
                    if now >= restart_at[slot] and not self._stopping:
                        del restart_at[slot]
                        self._spawn(slot)
                    continue
                code = proc.poll()
                if code is None:
                    continue
                mark_worker_dead(proc.pid, self._metrics_dir)
                quick = now - self._started_at[slot] < _CRASH_WINDOW
                self._crashes[slot] = self._crashes.get(slot, 0) + 1 if quick else 0
                delay = min(_MAX_BACKOFF, 0.1 * 2 ** self._crashes[slot]) if quick else 0.0
                log.warning("worker %d (pid %d) exited with %s; restarting in %.1fs",
                            slot, proc.pid, code, delay)
                restart_at[slot] = now + delay
        return self._stop_all(restart_at)

    def _stop_all(self, not_running: dict[int, float]) -> int:
        alive = [p for s, p in self._workers.items() if s not in not_running and p.poll() is None]
        for proc in alive:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._drain_seconds
        for proc in alive:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not drain in time; killing it", proc.pid)
                proc.kill()
                proc.wait()
        for proc in alive:
            mark_worker_dead(proc.pid, self._metrics_dir)
        log.info("all workers stopped")
        return 0
