"""A real haproxy for end-to-end tests: scripts/haproxy.cfg (the file docker-compose.yml
mounts and scripts/cluster uses), configured through its ROOMCAST_LB_* variables, on free
loopback ports, stopped by PID."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from tests.e2e.procs import REPO, free_port, wait_for_port

HAPROXY_CFG = REPO / "scripts" / "haproxy.cfg"
LB_PREFIX = "ROOMCAST_LB_"
_START_ATTEMPTS = 3


def haproxy_executable() -> str | None:
    """haproxy on PATH, or where Debian puts it (/usr/sbin is not on every PATH)."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def lb_env(bind: str, nodes: list[str], **extra: str) -> dict[str, str]:
    """os.environ without any ROOMCAST_LB_* of the caller, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LB_PREFIX)}
    env[LB_PREFIX + "BIND"] = bind
    for i, address in enumerate(nodes, start=1):
        env[f"{LB_PREFIX}NODE{i}"] = address
    env.update({LB_PREFIX + k.upper(): v for k, v in extra.items()})
    return env


class HAProxy:
    """``haproxy -db -f scripts/haproxy.cfg`` in front of ``nodes`` ("host:port" each),
    with the stats page on a second free port (for server states)."""

    def __init__(self, nodes: list[str], *, check_inter: str = "200ms") -> None:
        executable = haproxy_executable()
        if executable is None:
            raise RuntimeError("haproxy is not installed (scripts/test installs it)")
        self.executable = executable
        self.nodes = list(nodes)
        self.check_inter = check_inter
        self.port = 0
        self.stats_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        fd, self._log_path = tempfile.mkstemp(prefix="roomcast-haproxy-", suffix=".log")
        os.close(fd)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return lb_env(f"127.0.0.1:{self.port}", self.nodes, check_inter=self.check_inter,
                      stats=f"127.0.0.1:{self.stats_port}")

    def start(self) -> HAProxy:
        for attempt in range(_START_ATTEMPTS):
            self.port, self.stats_port = free_port(), free_port()
            with open(self._log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [self.executable, "-db", "-f", str(HAPROXY_CFG)], cwd=REPO,
                    env=self.env(), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                wait_for_port(self.port, self.proc)
                wait_for_port(self.stats_port, self.proc)
                return self
            except RuntimeError:
                # exited: most likely a free port was taken meanwhile; try others
                self.stop()
                if attempt == _START_ATTEMPTS - 1:
                    raise RuntimeError(f"haproxy did not start:\n{self.log()}") from None
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def log(self) -> str:
        return Path(self._log_path).read_text(errors="replace")

    def server_states(self) -> dict[str, str]:
        """Server name -> status ("UP", "DOWN", "UP 1/2", ...) from the stats CSV."""
        url = f"http://127.0.0.1:{self.stats_port}/;csv"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
        return {row["svname"]: row["status"] for row in rows
                if row["pxname"] == "roomcast_nodes" and row["svname"].startswith("node")}

    def wait_states(self, expected: dict[str, str], timeout: float = 10.0) -> None:
        """Until every named server has exactly the expected status."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.server_states()
            if all(states.get(name) == status for name, status in expected.items()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"haproxy servers {states}, expected {expected}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to our haproxy's PID (SIGKILL if it lingers), and reap it."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self._log_path)

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()
