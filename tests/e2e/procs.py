"""Real node processes for end-to-end tests: started on free ports, always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]

__all__ = ["REPO", "NodePool", "NodeProcess", "free_port", "wait_for_port"]

test_loop: str | None = None
"""``--loop`` for nodes the running test starts without naming one: the event loop the
test itself runs on (set by tests/e2e/conftest.py), None for roomcast's default."""


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    """Return once ``port`` accepts connections; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


class NodeProcess:
    """``roomcast serve`` in a child process on a free port, with ``--loop loop`` (by
    default the loop of the test that starts it: ``test_loop``)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 loop: str | None = None) -> None:
        self.port = free_port()
        self.loop = loop if loop is not None else test_loop
        self.args = list(args) if self.loop is None else ["--loop", self.loop, *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        fd, self._log_path = tempfile.mkstemp(prefix="roomcast-node-", suffix=".log")
        os.close(fd)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, attempts: int = 3) -> NodeProcess:
        """Start and wait until it listens; on a port taken meanwhile, retry on a new one."""
        for attempt in range(attempts):
            cmd = [sys.executable, "-m", "roomcast.node.cli", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), *self.args]
            with open(self._log_path, "ab") as log:
                self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log,
                                             stderr=subprocess.STDOUT)
            try:
                wait_for_port(self.port, self.proc)
                return self
            except RuntimeError:
                self.kill()
                if attempt + 1 == attempts or "address already in use" not in self.log():
                    raise
                self.port = free_port()  # another process took it between pick and bind
            except BaseException:
                self.kill()
                raise
        raise AssertionError("unreachable")

    def log(self) -> str:
        return Path(self._log_path).read_text(errors="replace")

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL and reap, if still running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


class NodePool:
    """Node processes shared by the tests of one module: one per loop and arguments,
    started when a test first asks for it, all stopped by ``close``."""

    def __init__(self) -> None:
        self._nodes: dict[tuple[str | None, tuple[str, ...]], NodeProcess] = {}

    def get(self, *args: str) -> NodeProcess:
        """The running node with ``args`` on the current test's loop (``test_loop``)."""
        key = (test_loop, args)
        node = self._nodes.get(key)
        if node is None or node.proc is None or node.proc.poll() is not None:
            node = self._nodes[key] = NodeProcess(*args).start()
        return node

    def close(self) -> None:
        for node in self._nodes.values():
            node.kill()
        self._nodes.clear()
