"""A private redis-server for tests: free loopback port, no persistence, killable on purpose.

It only ever signals the one process it started, so tests can kill, restart (same port),
freeze and thaw Redis without touching any other Redis on the machine.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

_START_ATTEMPTS = 3


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` child process on 127.0.0.1, started and stopped by the test."""

    def __init__(
        self,
        port: int | None = None,
        *,
        executable: str = "redis-server",
        startup_timeout: float = 10.0,
        extra_args: tuple[str, ...] = (),
        unix_socket: bool = False,
    ) -> None:
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self._executable = executable
        self._startup_timeout = startup_timeout
        self._dir = Path(tempfile.mkdtemp(prefix="roomcast-redis-"))
        self._unix_socket = self._dir / "redis.sock" if unix_socket else None
        if self._unix_socket is not None:
            extra_args = (*extra_args, "--unixsocket", str(self._unix_socket),
                          "--unixsocketperm", "700")
        self._extra_args = extra_args
        self._proc: subprocess.Popen[bytes] | None = None
        self._frozen = False
        self.password: str | None = None
        """Set by ``config_set("requirepass", ...)`` so helper calls keep authenticating."""

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0`` (no password, even if one is set)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """``unix://<socket>?db=0``; only when created with ``unix_socket=True``."""
        if self._unix_socket is None:
            raise RuntimeError("this RedisServer was created without unix_socket=True")
        return f"unix://{self._unix_socket}?db=0"

    @property
    def directory(self) -> Path:
        """The server's private working directory (log file, unix socket if any)."""
        return self._dir

    @property
    def running(self) -> bool:
        """True while the process started by this object is alive (frozen counts)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisServer:
        """Start redis-server (again on the same port after stop/kill); wait for PING."""
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        for attempt in range(_START_ATTEMPTS):
            try:
                self._spawn_and_wait()
                return self
            except _PortTaken:
                # a free port chosen by us was grabbed meanwhile: pick another
                if self._fixed_port or attempt == _START_ATTEMPTS - 1:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; no-op if not running."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            if self._frozen:
                proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on TERM
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL, as a crash would, and wait for the process to be gone."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._reap()

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its sockets open but answers nothing."""
        self._signal(signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        """SIGCONT: undo ``freeze``."""
        self._signal(signal.SIGCONT)
        self._frozen = False

    def config_set(self, name: str, value: str) -> None:
        """CONFIG SET on the running server (remembers ``requirepass`` for later calls)."""
        with self.client() as client:
            client.config_set(name, value)
        if name.lower() == "requirepass":
            self.password = value or None

    def client(self) -> redis.Redis:
        """A synchronous client for checks made outside the event loop."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password,
            socket_timeout=5, socket_connect_timeout=5,
        )

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's log, for failure messages."""
        try:
            text = (self._dir / "redis.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def cleanup(self) -> None:
        """Stop the server if needed and delete its directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        if not self.running:
            try:
                self.start()
            except BaseException:
                self.cleanup()
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- private ---------------------------------------------------------------------

    def _spawn_and_wait(self) -> None:
        args = [
            self._executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--logfile", "redis.log",
            *self._extra_args,
        ]
        if self.password:
            args += ["--requirepass", self.password]
        with contextlib.suppress(FileNotFoundError):
            (self._dir / "redis.log").unlink()
        self._proc = subprocess.Popen(
            args, cwd=self._dir, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self._frozen = False
        try:
            self._wait_for_ping()
        except BaseException:
            self.kill()
            raise

    def _wait_for_ping(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        delay = 0.005
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                tail = self.log_tail()
                if "Address already in use" in tail:
                    raise _PortTaken(f"port {self.port} is taken")
                raise RuntimeError(f"redis-server exited during startup:\n{tail}")
            if self._answers_ping():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"redis-server on port {self.port} did not answer PING within "
                    f"{self._startup_timeout} s:\n{self.log_tail()}"
                )
            time.sleep(delay)  # poll interval between attempts, not a synchronisation
            delay = min(delay * 2, 0.1)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                if self.password:
                    pw = self.password.encode()
                    sock.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
                    if not sock.recv(64).startswith(b"+OK"):
                        return False
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _signal(self, signum: int) -> None:
        if not self.running or self._proc is None:
            raise RuntimeError(f"redis-server on port {self.port} is not running")
        self._proc.send_signal(signum)

    def _reap(self) -> None:
        self._proc = None
        self._frozen = False

    def __del__(self) -> None:
        # last resort if a test forgot cleanup: never leave our child running
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
                proc.wait()
        directory = getattr(self, "_dir", None)
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


class _PortTaken(RuntimeError):
    """redis-server could not bind its port."""
