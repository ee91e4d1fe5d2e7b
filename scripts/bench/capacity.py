"""Capacity: 50,000 idle connections on one machine through ``roomcast serve --workers``.

The open-file limit is per process (20,000 here), so both sides are split: the server
is ``roomcast serve --workers W`` (W processes on one port, SO_REUSEPORT, a private
redis-server between them) and the load generator is ``--clients`` processes, each
connecting from its own loopback source addresses. Every client joins one room through
the demo chat route with ``quiet=1`` (no join/leave notice: a notice per join would
cost N*N/2 deliveries to fill the room) and answers the workers' keepalive pings.

Measured, in order:

1. connect: all client processes start together; accepts/s is the upgrades held over
   the wall time from the first connect to the last 101;
2. spread: each worker's sockets over its own idle baseline (from /proc), and the
   connection total of /metrics (summed over workers);
3. idle hold (``--hold`` s, pings every ``--ping-interval`` s): the workers' CPU %,
   pings the clients answered, and the connections open at the end of the hold against
   the start (a client that missed a pong would have been closed); RSS per connection is
   the workers' RSS growth over their idle baseline divided by the connections held;
4. broadcast: ``--messages`` messages, one at a time, posted to the room through the
   HTTP API (POST /api/rooms/ROOM/messages) on the shared port; every client process
   counts receipts: delivered/expected and time from the POST to the last receipt.

Every process started here (redis-server, the supervisor and its workers, the client
processes) is stopped on exit, failure or Ctrl-C.

    flock /tmp/bench.lock python scripts/bench/capacity.py [--connections 50000]
        [--workers 4] [--clients 4] [--sources 16] [--hold 30] [--ping-interval 10]
        [--messages 5] [--loop auto|asyncio|uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import _lib

from roomcast.node.cli import resolve_loop
from tests.e2e.procs import free_port
from tests.redis_server import RedisServer

ROOM = "capacity"
API_KEY = "capacity-bench-key"
PATH = f"/chat?room={ROOM}&name=c&quiet=1"
NOISY_PATH = f"/chat?room={ROOM}&name=c"
"""Without quiet=1: every join sends the whole room a notice (``--notices``)."""


# -- the client processes ----------------------------------------------------------------


async def _client_main(port: int, count: int, sources: list[str], concurrency: int,
                       handshake_timeout: float, path: str) -> None:
    """One load-generator process: connect ``count`` clients when told, then answer
    the parent's commands (one JSON line each) on stdin/stdout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "pid": os.getpid()})
    await reader.readline()  # "go"
    clients: list[_lib.Client] = []
    errors: Counter[str] = Counter()
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            ready: asyncio.Future[None] = loop.create_future()
            try:
                _, proto = await loop.create_connection(
                    lambda: _lib.Client(f"127.0.0.1:{port}", path, ready),
                    "127.0.0.1", port, local_addr=(sources[i % len(sources)], 0))
                clients.append(proto)
                await asyncio.wait_for(ready, handshake_timeout)
            except (OSError, RuntimeError, TimeoutError) as exc:
                text = str(exc)
                if isinstance(exc, RuntimeError):  # the server's refusal: its status line
                    text = text.split("\r\n", 1)[0]
                errors[f"{type(exc).__name__}: {text}"[:80]] += 1

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    end = time.perf_counter()
    held = [c for c in clients if c.ready.done() and c.ready.exception() is None
            and not c.closed]
    kept = set(held)
    _lib.close_all([c for c in clients if c not in kept])  # timed out: let go
    reply({"tried": count, "held": len(held), "start": start, "end": end,
           "errors": dict(errors)})
    while True:
        line = (await reader.readline()).decode().split()
        if not line or line[0] == "quit":
            break
        if line[0] == "status":
            reply({"open": sum(1 for c in held if not c.closed),
                   "pings": sum(c.pings for c in held),
                   "pinged": sum(1 for c in held if c.pings),
                   "frames": sum(c.frames for c in held),
                   "rss_kb": _lib.rss_kb(os.getpid())})
        elif line[0] == "wait":  # every held client should have this many frames
            want, stall = int(line[1]), float(line[2])
            await _wait_frames(held, want, stall)
            reached = [c for c in held if c.frames >= want]
            reply({"delivered": len(reached),
                   "last": max((c.last for c in reached), default=0.0)})
    _lib.close_all(clients)


async def _wait_frames(clients: list[_lib.Client], want: int, stall: float) -> None:
    """Until every client has ``want`` frames, or no frame came for ``stall`` s."""
    previous, since = -1, time.perf_counter()
    while True:
        total = sum(min(c.frames, want) for c in clients)
        now = time.perf_counter()
        if total >= want * len(clients):
            return
        if total != previous:
            previous, since = total, now
        elif now - since > stall:
            return
        await asyncio.sleep(0.01)


def client_role(args: argparse.Namespace) -> None:
    asyncio.run(_client_main(args.port, args.count, args.source_list.split(","),
                        args.concurrency, args.handshake_timeout,
                        NOISY_PATH if args.notices else PATH))


class ClientProc:
    """A load-generator child process, spoken to in JSON lines."""

    def __init__(self, port: int, count: int, sources: list[str], concurrency: int,
                 handshake_timeout: float, notices: bool) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--client-role", "--port", str(port),
             "--count", str(count), "--source-list", ",".join(sources),
             "--concurrency", str(concurrency),
             "--handshake-timeout", str(handshake_timeout)]
            + (["--notices"] if notices else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            cwd=_lib.ROOT)
        self.count = count

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict[str, Any]:
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        line = out.readline()
        if not line:
            raise RuntimeError(f"client process {self.proc.pid} exited "
                               f"({self.proc.poll()})")
        data: dict[str, Any] = json.loads(line)
        return data

    def ask(self, line: str) -> dict[str, Any]:
        self.send(line)
        return self.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.send("quit")
        _lib.end_process(self.proc, 15, None)  # asked to quit: no signal


def ask_all(procs: list[ClientProc], line: str) -> list[dict[str, Any]]:
    """Send ``line`` to every client process at once, then read every answer."""
    for p in procs:
        p.send(line)
    return [p.read() for p in procs]


# -- the server ----------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (the supervisor's workers)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def listeners(port: int) -> int:
    """Sockets listening on ``port`` (one per worker with SO_REUSEPORT)."""
    hexport = f":{port:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(hexport) and fields[3] == "0A":
            count += 1
    return count


def sockets(pid: int) -> int:
    """Open sockets of one process."""
    n = 0
    for fd in os.scandir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(fd.path).startswith("socket:"):
                n += 1
    return n


def metrics_connections(port: int) -> int:
    """roomcast_connections from /metrics (summed over the live workers)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    match = re.search(r"^roomcast_connections(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
    return int(float(match.group(1))) if match else -1


def publish(port: int, body: bytes) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/rooms/{ROOM}/messages", data=body, method="POST",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        if resp.status != 202:
            raise RuntimeError(f"publish: HTTP {resp.status}")


@dataclass
class Result:
    loop: str
    workers: int
    clients: int
    sources: int
    backlog: int = 0
    tried: int = 0
    held: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    connect_s: float = 0.0
    per_worker: list[int] = field(default_factory=list)
    metrics_total: int = 0
    rss_base_mb: float = 0.0
    rss_held_mb: float = 0.0
    kb_per_conn: float = float("nan")
    client_rss_mb: float = 0.0
    idle_cpu: float = float("nan")
    redis_cpu: float = float("nan")
    open_start: int = 0
    open_end: int = 0
    pings: int = 0
    pinged: int = 0
    delivered: int = 0
    expected: int = 0
    receipt_ms: list[float] = field(default_factory=list)
    frames_before: int = 0
    connect_cpu_s: float = 0.0
    client_connect_cpu_s: float = 0.0
    tcp: dict[str, int] = field(default_factory=dict)
    load_before: str = ""
    load_after: str = ""

    @property
    def accepts(self) -> float:
        return self.held / self.connect_s if self.connect_s else 0.0


def tcp_counters() -> dict[str, int]:
    """The kernel's TcpExt counters that show a full accept queue or lost SYNs."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=True))
            return {k: table.get(k, 0) for k in ("ListenOverflows", "ListenDrops",
                                                 "TCPSynRetrans", "TCPReqQFullDrop")}
    return {}


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run(args: argparse.Namespace) -> Result:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if args.notices and args.messages:
        raise SystemExit("--notices: the join notices are frames too; pass --messages 0")
    per_client = -(-args.connections // args.clients)
    if per_client > soft - 200:
        raise SystemExit(f"{per_client} connections per client process is over the open-file "
                         f"limit ({soft}): use more --clients")
    max_conns = args.max_connections or soft - 500
    sources = [f"127.0.0.{i}" for i in range(1, args.sources + 1)]
    result = Result(resolve_loop(args.loop), args.workers, args.clients, args.sources,
                    backlog=args.backlog, load_before=load())
    redis = RedisServer().start()
    port = free_port()
    cmd = [sys.executable, "-m", "roomcast.node.cli", "serve", "--workers", str(args.workers),
           "--redis", redis.url, "--host", "127.0.0.1", "--port", str(port),
           "--ping-interval-ms", str(int(args.ping_interval * 1000)),
           "--max-connections", str(max_conns), "--api-key", API_KEY,
           "--loop", args.loop, "--log-level", args.log_level]
    if args.backlog:
        cmd += ["--backlog", str(args.backlog)]
    print("server: " + " ".join(cmd[1:]).replace(API_KEY, "KEY"), file=sys.stderr)
    supervisor = subprocess.Popen(cmd, cwd=_lib.ROOT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
    procs: list[ClientProc] = []
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while listeners(port) < args.workers:
            if supervisor.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("roomcast serve did not start its workers")
            time.sleep(0.2)
        workers = children(supervisor.pid)
        time.sleep(2.0)  # imports done, first heartbeats sent
        base_rss = {w: _lib.rss_kb(w) for w in workers}
        base_sock = {w: sockets(w) for w in workers}
        result.rss_base_mb = sum(base_rss.values()) / 1024

        # 1. connect
        share = [args.connections // args.clients + (1 if i < args.connections % args.clients
                                                     else 0) for i in range(args.clients)]
        per_src = max(1, len(sources) // args.clients)
        for i, n in enumerate(share):
            mine = sources[i * per_src:(i + 1) * per_src] or sources
            procs.append(ClientProc(port, n, mine, args.concurrency, args.handshake_timeout,
                                    args.notices))
        for p in procs:
            p.read()  # ready
        print(f"connecting {args.connections} from {args.clients} processes...",
              file=sys.stderr)
        cpu0 = sum(_lib.cpu_seconds(w) for w in workers)
        ccpu0 = sum(_lib.cpu_seconds(p.proc.pid) for p in procs)
        tcp0 = tcp_counters()
        done = ask_all(procs, "go")
        result.connect_cpu_s = sum(_lib.cpu_seconds(w) for w in workers) - cpu0
        result.client_connect_cpu_s = sum(_lib.cpu_seconds(p.proc.pid) for p in procs) - ccpu0
        result.tcp = {k: v - tcp0.get(k, 0) for k, v in tcp_counters().items()}
        result.tried = sum(d["tried"] for d in done)
        result.held = sum(d["held"] for d in done)
        result.connect_s = max(d["end"] for d in done) - min(d["start"] for d in done)
        for d in done:
            for k, v in d["errors"].items():
                result.errors[k] = result.errors.get(k, 0) + v
        print(f"held {result.held}/{result.tried} in {result.connect_s:.1f} s "
              f"{result.errors or ''}", file=sys.stderr)
        time.sleep(2.0)
        if children(supervisor.pid) != workers:
            print("warning: a worker was replaced during the run", file=sys.stderr)
        result.per_worker = [sockets(w) - base_sock[w] for w in workers]
        result.metrics_total = metrics_connections(port)

        # 2. idle hold with pings
        status = ask_all(procs, "status")
        result.open_start = sum(s["open"] for s in status)
        pings0 = sum(s["pings"] for s in status)
        cpu0 = sum(_lib.cpu_seconds(w) for w in workers) + _lib.cpu_seconds(supervisor.pid)
        redis_pid = redis._proc.pid if redis._proc is not None else 0
        rcpu0 = _lib.cpu_seconds(redis_pid)
        t0 = time.perf_counter()
        time.sleep(args.hold)
        elapsed = time.perf_counter() - t0
        cpu1 = sum(_lib.cpu_seconds(w) for w in workers) + _lib.cpu_seconds(supervisor.pid)
        result.idle_cpu = (cpu1 - cpu0) / elapsed * 100
        result.redis_cpu = (_lib.cpu_seconds(redis_pid) - rcpu0) / elapsed * 100
        status = ask_all(procs, "status")
        result.open_end = sum(s["open"] for s in status)
        result.pings = sum(s["pings"] for s in status) - pings0
        result.pinged = sum(s["pinged"] for s in status)
        result.client_rss_mb = sum(s["rss_kb"] for s in status) / 1024
        result.frames_before = sum(s["frames"] for s in status)
        rss = sum(_lib.rss_kb(w) for w in workers)
        result.rss_held_mb = rss / 1024
        if result.held:
            result.kb_per_conn = (rss - sum(base_rss.values())) / result.held

        # 3. broadcast to the room
        for i in range(1, args.messages + 1):
            sent = time.perf_counter()
            publish(port, _lib.stamp_payload(64))
            answers = ask_all(procs, f"wait {i} {args.stall}")
            got = sum(a["delivered"] for a in answers)
            result.delivered += got
            result.expected += result.open_end
            result.receipt_ms.append((max(a["last"] for a in answers) - sent) * 1e3)
            print(f"message {i}: {got}/{result.open_end} in "
                  f"{result.receipt_ms[-1]:.0f} ms", file=sys.stderr)
            time.sleep(0.5)
    finally:
        for p in procs:
            p.stop()
        stop_server(supervisor, workers)
        redis.stop()
        redis.cleanup()
        result.load_after = load()
    return result


def stop_server(supervisor: subprocess.Popen[bytes], workers: list[int]) -> None:
    """SIGTERM the supervisor (it drains its workers); SIGKILL what is left after 40 s."""
    workers = workers + [w for w in children(supervisor.pid) if w not in workers] \
        if supervisor.poll() is None else workers
    _lib.end_process(supervisor, 40)
    for w in workers:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{w}/stat").read_text().split(") ", 1)[1][0] != "Z":
                os.kill(w, signal.SIGKILL)


def table(r: Result, args: argparse.Namespace) -> str:
    med = statistics.median(r.receipt_ms) if r.receipt_ms else float("nan")
    worst = max(r.receipt_ms) if r.receipt_ms else float("nan")
    rows = [
        ("event loop (workers)", r.loop),
        ("workers / client processes / source addresses",
         f"{r.workers} / {r.clients} / {r.sources}"),
        ("listen backlog per worker", str(r.backlog or "roomcast serve's default")),
        ("connections held / tried", f"{r.held:,} / {r.tried:,}"
         + (f" ({sum(r.errors.values())} failed)" if r.errors else "")),
        ("per worker (sockets over baseline)", " / ".join(f"{n:,}" for n in r.per_worker)),
        ("/metrics roomcast_connections", f"{r.metrics_total:,}"),
        ("connect phase", f"{r.connect_s:.1f} s, {r.accepts:,.0f} accepts/s"),
        ("CPU per accepted connection, workers / load generator",
         f"{r.connect_cpu_s / max(r.held, 1) * 1e6:.0f} / "
         f"{r.client_connect_cpu_s / max(r.held, 1) * 1e6:.0f} µs"),
        ("kernel during connect (TcpExt)", ", ".join(f"{k} {v}" for k, v in r.tcp.items())),
        ("worker RSS idle → held", f"{r.rss_base_mb:.0f} MB → {r.rss_held_mb:.0f} MB"),
        ("RSS per connection", f"{r.kb_per_conn:.1f} KB"),
        (f"idle CPU over {args.hold:g} s (pings every {args.ping_interval:g} s)",
         f"{r.idle_cpu:.1f} % of one core (workers + supervisor); redis {r.redis_cpu:.1f} %"),
        ("pings answered in the hold", f"{r.pings:,} ({r.pinged:,} clients pinged)"),
        ("open at start / end of hold", f"{r.open_start:,} / {r.open_end:,}"),
        ("frames received before the broadcast (join notices)", f"{r.frames_before:,}"),
        (f"broadcast: {args.messages} messages, delivered / expected",
         f"{r.delivered:,} / {r.expected:,}"),
        ("POST to last receipt, median / max", f"{med:.0f} / {worst:.0f} ms"),
        ("load generator RSS", f"{r.client_rss_mb:.0f} MB"),
        ("load average before / after", f"{r.load_before} / {r.load_after}"),
    ]
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if r.errors:
        lines.append("")
        lines += [f"- {n} x {k}" for k, n in sorted(r.errors.items(), key=lambda e: -e[1])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4, help="load-generator processes")
    parser.add_argument("--sources", type=int, default=16,
                        help="loopback source addresses 127.0.0.1-N, split over the clients")
    parser.add_argument("--hold", type=float, default=30.0, help="idle seconds measured")
    parser.add_argument("--ping-interval", type=float, default=10.0, help="seconds")
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument("--max-connections", type=int, default=0,
                        help="per worker (default: the open-file limit - 500)")
    parser.add_argument("--backlog", type=int, default=0,
                        help="listen backlog per worker (default: roomcast serve's)")
    parser.add_argument("--concurrency", type=int, default=100,
                        help="handshakes in flight per client process")
    parser.add_argument("--handshake-timeout", type=float, default=60.0)
    parser.add_argument("--stall", type=float, default=10.0,
                        help="a broadcast is over once no receipt came for this long")
    parser.add_argument("--log-level", default="WARNING",
                        help="of roomcast serve (INFO logs a line per upgrade)")
    parser.add_argument("--notices", action="store_true",
                        help="join without quiet=1: each join notifies the whole room "
                             "(to show its cost; use with --messages 0)")
    parser.add_argument("--client-role", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--source-list", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_role:
        client_role(args)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cleanup runs on SIGTERM too
    result = run(args)
    print(f"\ncapacity: {args.connections:,} connections through roomcast serve --workers "
          f"{args.workers}; {time.strftime('%Y-%m-%d %H:%M')}, {_lib.machine()}\n")
    print(table(result, args))


if __name__ == "__main__":
    main()
