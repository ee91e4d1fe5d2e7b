"""What every benchmark shares: server processes, a cheap WebSocket client, /proc readers.

The load generator is the benchmark process itself (asyncio, raw frames, no client
library); servers run in their own processes, each cluster with a private
redis-server, and are always stopped, even when a benchmark fails.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.e2e.procs import free_port, wait_for_port  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
BENCH = ROOT / "scripts/bench"
SERVERS = {
    "roomcast": BENCH / "roomcast_node.py",
    "reference": BENCH / "reference_node.py",
    "socketio": BENCH / "socketio_node.py",
    "socketio-node": BENCH / "socketio_js_node.py",
}
if os.environ.get("BENCH_BEFORE"):
    # An older checkout (with this roomcast_node.py copied in) as the server "before",
    # to compare a change side by side: BENCH_BEFORE=/path/to/old/tree.
    SERVERS["before"] = Path(os.environ["BENCH_BEFORE"]) / "scripts/bench/roomcast_node.py"


def _before_pythonpath(tree: Path) -> str:
    """A PYTHONPATH on which ``tree``'s own packages win over the installed roomcast: a
    ``roomcast`` folder of links to its node/, broker/, shared/ (trees since the packages
    install as roomcast.*), then the tree itself (older trees import ``node`` etc.)."""
    links = Path(tempfile.mkdtemp(prefix="roomcast-before-"))
    (links / "roomcast").mkdir()
    for name in ("node", "broker", "shared"):
        (links / "roomcast" / name).symlink_to(tree.resolve() / name)
    return os.pathsep.join([str(links), str(tree.resolve())])
_CLUSTERS = 0
"""Clusters profiled by this process so far: each one's files get their own names."""
KEEPALIVE: Final = ("--ping-interval", "25")
"""Every server pings each client every 25 s (python-socketio's default) in the
fan-out and latency workloads, so keepalive costs all of them alike."""
SIO_PREFIX = b'42["msg","'
"""What python-socketio puts before the payload of a ``msg`` event (JSON string)."""


def cpu_seconds(pid: int) -> float:
    """user+sys CPU seconds of one process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_kb(pid: int) -> int:
    """Resident set size of one process in KiB, from /proc."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB


def end_process(proc: subprocess.Popen[Any], timeout: float,
                sig: int | None = signal.SIGTERM) -> None:
    """Send ``sig`` to ``proc`` if it still runs (None: it was asked some other way),
    wait up to ``timeout`` seconds for it to exit, then SIGKILL it (and reap it)."""
    if sig is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def machine() -> str:
    """CPU model, cores and Python version, for the report."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{model}, {os.cpu_count()} cores, Linux {os.uname().release}, "
            f"Python {sys.version.split()[0]}")


# -- server processes ------------------------------------------------------------------


@dataclass
class Cluster:
    """``nodes`` server processes of one kind, sharing one private redis-server.

    A roomcast server name may end in ``@asyncio`` or ``@uvloop``: its nodes run on that
    event loop (``roomcast`` alone runs on the default of ``roomcast serve``: uvloop when
    it is installed), so every workload can take both side by side.
    """

    server: str
    nodes: int = 2
    extra: Sequence[str] = ()
    redis: bool = True
    redis_server: RedisServer | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    profilers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    profile_windows: bool = False
    """With BENCH_PROFILE set: py-spy samples only inside ``profiled()`` windows (the
    benchmark marks its measured spans), not the nodes' whole life."""

    def start(self) -> Cluster:
        """Start Redis and the nodes; a node that dies at start-up (a free port taken
        meanwhile by another process) is retried on new ports, twice."""
        for attempt in range(3):
            try:
                return self._start()
            except RuntimeError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start(self) -> Cluster:
        self.procs, self.ports = [], []
        try:
            url = ""
            if self.redis:
                self.redis_server = RedisServer().start()
                url = self.redis_server.url
            kind, _, loop = self.server.partition("@")
            loop_args = ["--loop", loop] if loop else []
            for _ in range(self.nodes):
                port = free_port()
                cmd = [sys.executable, str(SERVERS[kind]), "--port", str(port),
                       "--redis", url, *loop_args, *self.extra]
                env = None
                if kind == "before":
                    # else the installed roomcast (this tree) would be what runs
                    env = {**os.environ, "PYTHONPATH": _before_pythonpath(
                        Path(os.environ["BENCH_BEFORE"]))}
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL,
                                                   env=env))
                self.ports.append(port)
            for proc, port in zip(self.procs, self.ports, strict=True):
                wait_for_port(port, proc, timeout=30)
            self._start_profilers()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def cpu(self) -> float:
        """user+sys seconds of all node processes."""
        return sum(cpu_seconds(pid) for pid in self.pids)

    def rss(self, index: int = 0) -> int:
        return rss_kb(self.procs[index].pid)

    def stats(self, index: int = 0) -> dict[str, object]:
        """The node's /stats JSON (bench nodes only)."""
        url = f"http://127.0.0.1:{self.ports[index]}/stats"
        with urllib.request.urlopen(url, timeout=10) as resp:
            data: dict[str, object] = json.load(resp)
        return data

    def _start_profilers(self) -> None:
        """With BENCH_PROFILE=DIR, py-spy samples every node into DIR (folded stacks),
        from start to stop, unless the cluster has ``profile_windows``."""
        if not os.environ.get("BENCH_PROFILE") or self.profile_windows:
            return
        global _CLUSTERS
        _CLUSTERS += 1
        self._spawn_profilers(f"{self.server}-{os.getpid()}-c{_CLUSTERS}")
        time.sleep(1.0)

    def _spawn_profilers(self, label: str) -> None:
        """One py-spy per node writing ``DIR/<label>-<i>.txt``.

        BENCH_PROFILE_RATE sets samples per second (250 by default);
        BENCH_PROFILE_NATIVE=1 adds native (C) frames, which py-spy can only take by
        pausing the process for each sample (else it reads without stopping it).
        Each file's node command line is added to ``DIR/index.txt``; what py-spy prints
        (samples, errors) goes to ``<label>-<i>.log``.
        """
        directory = Path(os.environ["BENCH_PROFILE"])
        directory.mkdir(parents=True, exist_ok=True)
        rate = os.environ.get("BENCH_PROFILE_RATE", "250")
        mode = "--native" if os.environ.get("BENCH_PROFILE_NATIVE") == "1" else "--nonblocking"
        with (directory / "index.txt").open("a") as index:
            for i, proc in enumerate(self.procs):
                out = directory / f"{label}-{i}.txt"
                assert isinstance(proc.args, list)
                index.write(f"{out.name}\t{mode} -r {rate}\t"
                            f"{' '.join(map(str, proc.args))}\n")
                with out.with_suffix(".log").open("wb") as log:  # its sample count
                    self.profilers.append(subprocess.Popen(
                        ["py-spy", "record", "--pid", str(proc.pid), "-o", str(out), "-f",
                         "raw", "-r", rate, mode],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    ))

    def _stop_profilers(self) -> None:
        for prof in self.profilers:
            end_process(prof, 20, signal.SIGINT)  # py-spy writes its output on SIGINT
        self.profilers = []

    @contextlib.asynccontextmanager
    async def profiled(self, label: str) -> AsyncIterator[None]:
        """With BENCH_PROFILE set and ``profile_windows``: py-spy samples every node
        while the block runs, into ``DIR/<label>-<i>.txt``; else nothing."""
        if not os.environ.get("BENCH_PROFILE") or not self.profile_windows:
            yield
            return
        self._spawn_profilers(label)
        await asyncio.sleep(1.0)  # py-spy attaches (and reads symbols) meanwhile
        try:
            yield
        finally:
            self._stop_profilers()

    def stop(self) -> None:
        """SIGTERM every node, SIGKILL what does not exit in 10 s, stop Redis."""
        self._stop_profilers()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server.cleanup()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the client --------------------------------------------------------------------------


def masked(payload: bytes, opcode: int = 1, *, rsv1: bool = False) -> bytes:
    """A masked client frame (the mask is fixed: the server only has to undo it).

    ``rsv1`` marks a permessage-deflate (compressed) message.
    """
    mask = b"\x37\xfa\x21\x3d"
    first = 0x80 | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    if not n:
        return bytes((first, 0x80)) + mask
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 0x10000:
        head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    body = (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big"))
    return head + mask + body.to_bytes(n, "big")


def stamp_payload(size: int) -> bytes:
    """``size`` bytes of text starting with the sender's monotonic clock (µs)."""
    head = b"%d " % int(time.perf_counter() * 1e6)
    return head + b"x" * (size - len(head))


class Client(asyncio.Protocol):
    """One WebSocket (or Socket.IO over WebSocket) client that counts data frames.

    Parses only frame headers; with ``stamps`` set it also reads the sender's clock at
    the start of each payload and records the delay. Answers Engine.IO pings.
    """

    def __init__(self, host: str, path: str, ready: asyncio.Future[None], *,
                 sio: bool = False, deflate: bool = False,
                 stamps: list[float] | None = None) -> None:
        extensions = "Sec-WebSocket-Extensions: permessage-deflate\r\n" if deflate else ""
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            f"{extensions}\r\n"
        ).encode()
        self.ready = ready
        self.sio = sio
        self.stamps = stamps
        self.skip = len(SIO_PREFIX) if sio else 0
        self.head = b""
        self.response = b""
        """The server's handshake response (status line and headers)."""
        self.buf = b""
        self.frames = 0
        self.reads = 0
        """``data_received`` calls: frames / reads shows how many frames a write held."""
        self.compressed = 0
        self.pings = 0
        """WebSocket pings received (each answered with a pong at once)."""
        self.last = 0.0
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False
        """True while the transport's write buffer is over its high-water mark."""
        self.on_resume: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.ready.done() and not self.buf and self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.head.startswith(b"HTTP/1.1 101"):
                self.ready.set_exception(RuntimeError(self.head[:60].decode()))
                return
            data = self.head[end + 4:]
            self.response = self.head[:end]
            self.head = None  # type: ignore[assignment]
            if not self.sio:
                self.ready.set_result(None)
        now = time.perf_counter()
        self.reads += 1
        buf = self.buf + data if self.buf else data
        pos, end = 0, len(buf)
        frames = 0
        stamps = self.stamps
        while end - pos >= 2:
            b0, n = buf[pos], buf[pos + 1] & 0x7F
            start = pos + 2
            if n == 126:
                if end - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 4], "big")
                start = pos + 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 10], "big")
                start = pos + 10
            if end < start + n:
                break
            opcode = b0 & 0x0F
            if opcode == 1 or opcode == 2:
                if self.sio:
                    self._sio_packet(buf[start:start + n], now)
                else:
                    frames += 1
                    if b0 & 0x40:
                        self.compressed += 1
                        if stamps is not None:
                            body = zlib.decompressobj(-15).decompress(
                                buf[start:start + n] + b"\x00\x00\xff\xff")
                            stamps.append(now - int(body[:body.index(b" ")]) / 1e6)
                    elif stamps is not None:
                        stamp = buf[start:buf.index(b" ", start)]
                        stamps.append(now - int(stamp) / 1e6)
            elif opcode == 9 and self.transport is not None:
                self.pings += 1
                self.transport.write(masked(buf[start:start + n], 0xA))  # keepalive pong
            elif opcode == 8:
                self.closed = True
            pos = start + n
        self.buf = buf[pos:] if pos < end else b""
        if frames:
            self.frames += frames
            self.last = now

    def _sio_packet(self, packet: bytes, now: float) -> None:
        if packet.startswith(b"42"):
            self.frames += 1
            self.last = now
            if self.stamps is not None:
                stamp = packet[self.skip:packet.index(b" ", self.skip)]
                self.stamps.append(now - int(stamp) / 1e6)
        elif packet == b"2" and self.transport is not None:
            self.transport.write(masked(b"3"))  # Engine.IO pong
        elif packet.startswith(b"0{") and self.transport is not None:
            self.transport.write(masked(b"40"))  # join the default namespace
        elif packet.startswith(b"40") and not self.ready.done():
            self.ready.set_result(None)

    def send_message(self, payload: bytes) -> None:
        """Send one text message (a ``msg`` event for Socket.IO)."""
        assert self.transport is not None
        if self.sio:
            payload = SIO_PREFIX + payload + b'"]'
        self.transport.write(masked(payload))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.on_resume is not None:
            self.on_resume()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.paused = False
        if self.on_resume is not None:
            self.on_resume()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed during the handshake"))


def speaks_socketio(server: str) -> bool:
    """True for the Socket.IO servers (python-socketio, socket.io on Node.js)."""
    return server.startswith("socketio")


def path_for(server: str, room: str) -> str:
    if speaks_socketio(server):
        return f"/socket.io/?EIO=4&transport=websocket&room={room}"
    return f"/bench?room={room}"


async def connect(server: str, port: int, count: int, room: str, *,
                  deflate: bool = False, stamps: list[float] | None = None,
                  sources: Sequence[str] = ("127.0.0.1",), concurrency: int = 200,
                  handshake_timeout: float = 60, path: str | None = None) -> list[Client]:
    """Open ``count`` clients to ``port``, all in ``room``; returns once all are ready.

    ``path`` overrides the request path (for roomcast and the reference node).
    """
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    path = path or path_for(server, room)
    sio = speaks_socketio(server)

    async def one(i: int) -> Client:
        async with sem:
            ready: asyncio.Future[None] = loop.create_future()
            source = sources[i % len(sources)]
            _, proto = await loop.create_connection(
                lambda: Client(f"127.0.0.1:{port}", path, ready, sio=sio, deflate=deflate,
                               stamps=stamps),
                "127.0.0.1", port, local_addr=(source, 0),
            )
            await asyncio.wait_for(ready, handshake_timeout)
            return proto

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def close_all(clients: Sequence[Client]) -> None:
    for c in clients:
        if c.transport is not None:
            c.transport.abort()


async def wait_for_count(clients: Sequence[Client], expected: int, *,
                         stall: float = 3.0, limit: float = 120.0) -> int:
    """Wait until the clients got ``expected`` frames, or nothing came for ``stall`` s."""
    previous, since = -1, time.perf_counter()
    deadline = since + limit
    while True:
        await asyncio.sleep(0.02)
        total = sum(c.frames for c in clients)
        now = time.perf_counter()
        if total >= expected or now > deadline:
            return total
        if total != previous:
            previous, since = total, now
        elif now - since > stall:
            return total


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of ``values`` by nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@contextlib.contextmanager
def timed(label: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    print(f"  [{label}: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
