"""Cross-node fan-out: one room of N members over 2 nodes, 64-byte text messages.

Runs roomcast and the minimal reference node (scripts/bench/reference_node.py) side by
side in one run, each with its own private redis-server, and prints per server:
delivered/expected, deliveries per second, and node CPU microseconds per delivery
(user+sys of the node processes from /proc, divided by deliveries).

    python scripts/bench/fanout.py [--members 1000] [--messages 300] [--size 64]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.e2e.procs import free_port, wait_for_port  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
NODES = {
    "roomcast": ROOT / "scripts/bench/roomcast_node.py",
    "reference": ROOT / "scripts/bench/reference_node.py",
}


def cpu_seconds(pid: int) -> float:
    """user+sys CPU seconds of one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Counter(asyncio.Protocol):
    """A WebSocket client that only counts the bytes the server sends after the 101."""

    def __init__(self, host: str, path: str, ready: asyncio.Future[None]) -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n\r\n"
        ).encode()
        self.ready = ready
        self.head = b""
        self.bytes = 0
        self.last = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.ready.done():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.head.startswith(b"HTTP/1.1 101"):
                self.ready.set_exception(RuntimeError(self.head[:60].decode()))
                return
            self.ready.set_result(None)
            data = self.head[end + 4 :]
        self.bytes += len(data)
        self.last = time.perf_counter()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed during handshake"))


@dataclass
class Result:
    server: str
    expected: int
    delivered: int
    seconds: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0

    @property
    def us_per_delivery(self) -> float:
        return self.cpu / self.delivered * 1e6 if self.delivered else float("inf")


def masked_text(payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes((0x81, 0x80 | len(payload))) + mask + body


async def connect(port: int, count: int) -> list[Counter]:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(200)

    async def one() -> Counter:
        async with sem:
            ready: asyncio.Future[None] = loop.create_future()
            _, proto = await loop.create_connection(
                lambda: Counter(f"127.0.0.1:{port}", "/bench?room=fanout", ready),
                "127.0.0.1", port,
            )
            await asyncio.wait_for(ready, 30)
            return proto

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def run(server: str, members: int, messages: int, size: int) -> Result:
    with RedisServer() as redis_server:
        ports = [free_port(), free_port()]
        procs = [
            subprocess.Popen(  # noqa: ASYNC220 (Popen returns at once; nothing waits)
                [sys.executable, str(NODES[server]), "--port", str(p), "--redis",
                 redis_server.url]
            )
            for p in ports
        ]
        try:
            for proc, port in zip(procs, ports, strict=True):
                wait_for_port(port, proc)
            clients = await connect(ports[0], members // 2)
            clients += await connect(ports[1], members - members // 2)
            await asyncio.sleep(1.0)  # let subscriptions and presence settle
            for c in clients:
                c.bytes = 0
            publisher = clients[0]
            frame_len = 2 + size
            expected = messages * members
            cpu0 = sum(cpu_seconds(p.pid) for p in procs)
            start = time.perf_counter()
            payload = b"m" * size
            assert publisher.transport is not None
            publisher.transport.write(masked_text(payload) * messages)
            previous, stalled_since = -1, time.perf_counter()
            while True:
                await asyncio.sleep(0.05)
                total = sum(c.bytes for c in clients) // frame_len
                if total >= expected:
                    break
                if total != previous:
                    previous, stalled_since = total, time.perf_counter()
                elif time.perf_counter() - stalled_since > 3.0:
                    break
            end = max(c.last for c in clients)
            cpu1 = sum(cpu_seconds(p.pid) for p in procs)
            delivered = sum(c.bytes for c in clients) // frame_len
            for c in clients:
                if c.transport is not None:
                    c.transport.abort()
            return Result(server, expected, delivered, end - start, cpu1 - cpu0)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--servers", default="reference,roomcast")
    args = parser.parse_args()
    results = [asyncio.run(run(s, args.members, args.messages, args.size))
               for s in args.servers.split(",")]
    print(f"fan-out: {args.members} members over 2 nodes, {args.messages} messages of "
          f"{args.size} B, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'server':<12}{'delivered/expected':>22}{'deliveries/s':>15}{'CPU us/delivery':>18}")
    for r in results:
        print(f"{r.server:<12}{f'{r.delivered}/{r.expected}':>22}{r.rate:>15,.0f}"
              f"{r.us_per_delivery:>18.2f}")
    by = {r.server: r for r in results}
    if "reference" in by and "roomcast" in by:
        ratio = by["roomcast"].us_per_delivery / by["reference"].us_per_delivery
        print(f"roomcast CPU per delivery = {ratio:.2f} x reference")


if __name__ == "__main__":
    main()
