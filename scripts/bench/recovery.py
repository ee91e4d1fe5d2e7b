"""Recovery at scale: ``--clients`` clients reconnecting at once, each ``--behind`` behind.

Two nodes (scripts/bench/history_node.py, history on) and a private redis-server. A
Publisher stores one message in the room (the position every client declares), then
``--behind`` more. Then ``--clients`` roomcast.v1 clients connect all at once, half to
each node, each declaring that position in ``roomcast.since``: each must get the
``--behind`` messages it missed, then ``joined`` with ``recovered: true``. Reports the
time from the first connect to the last ``joined`` (and percentiles of each client's
own time and of its upgrade), node CPU (both nodes, /proc), Redis CPU (``INFO cpu``) and
the load generator's CPU over that window, and the nodes' recovery counters.

    python scripts/bench/recovery.py [--clients 1000] [--behind 100] [--size 64]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import time
import urllib.parse
from pathlib import Path

import _lib
from history_fanout import redis_cpu

from roomcast.broker.publisher import Publisher
from roomcast.shared.history import History, HistoryPolicy

_lib.SERVERS["history"] = Path(__file__).resolve().parent / "history_node.py"
HISTORY = History(size=1000, ttl=300)


class Recovering(asyncio.Protocol):
    """A roomcast.v1 client that reads the frames of one recovery and times its end."""

    def __init__(self, port: int, path: str, ready: asyncio.Future[None],
                 done: asyncio.Future[float]) -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            "Sec-WebSocket-Protocol: roomcast.v1\r\n\r\n"
        ).encode()
        self.ready = ready
        self.done = done
        self.head: bytes | None = b""
        self.buf = b""
        self.messages = 0
        self.joined: dict[str, object] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.head.startswith(b"HTTP/1.1 101"):
                self.ready.set_exception(RuntimeError(self.head[:80].decode()))
                return
            data, self.head = self.head[end + 4:], None
            self.ready.set_result(None)
        buf = self.buf + data
        pos = 0
        while len(buf) - pos >= 2:
            b0, n = buf[pos], buf[pos + 1] & 0x7F
            start = pos + 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n, start = int.from_bytes(buf[pos + 2:pos + 4], "big"), pos + 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n, start = int.from_bytes(buf[pos + 2:pos + 10], "big"), pos + 10
            if len(buf) < start + n:
                break
            payload = buf[start:start + n]
            opcode = b0 & 0x0F
            if opcode == 1:
                self._text(payload)
            elif opcode == 9 and self.transport is not None:
                self.transport.write(_lib.masked(payload, 0xA))
            pos = start + n
        self.buf = buf[pos:]

    def _text(self, payload: bytes) -> None:
        if b'"joined"' in payload:
            self.joined = json.loads(payload)
            if not self.done.done():
                self.done.set_result(time.perf_counter())
        elif b'"message"' in payload:
            self.messages += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed during the handshake"))
        if not self.done.done():
            self.done.set_exception(ConnectionError("closed before joined"))


async def run(clients: int, behind: int, size: int) -> None:
    loop = asyncio.get_running_loop()
    with _lib.Cluster("history", extra=["--history-size", str(HISTORY.size),
                                        "--recovery-max", "1000"]) as cluster:
        assert cluster.redis_server is not None
        publisher = Publisher(cluster.redis_server.url, prefix="bench",
                              history=HistoryPolicy(HISTORY))
        try:
            since = await publisher.publish_to_room("rec", "x" * size)
            assert since is not None
            for _ in range(behind):
                await publisher.publish_to_room("rec", "m" * size)
        finally:
            await publisher.close()
        declared = json.dumps({"rec": list(since)}, separators=(",", ":"))
        path = "/bench?room=rec&roomcast.since=" + urllib.parse.quote(declared)
        await asyncio.sleep(1.0)  # let presence settle
        protos: list[Recovering] = []
        cpu0, redis0, own0 = cluster.cpu(), redis_cpu(cluster), time.process_time()
        start = time.perf_counter()
        upgraded: list[float] = []

        async def one(i: int) -> float:
            port = cluster.ports[i % 2]
            ready: asyncio.Future[None] = loop.create_future()
            done: asyncio.Future[float] = loop.create_future()
            _, proto = await loop.create_connection(
                lambda: Recovering(port, path, ready, done), "127.0.0.1", port)
            protos.append(proto)
            await asyncio.wait_for(ready, 120)
            upgraded.append(time.perf_counter() - start)
            return await asyncio.wait_for(done, 120)

        try:
            ends = await asyncio.gather(*(one(i) for i in range(clients)))
            cpu, redis = cluster.cpu() - cpu0, redis_cpu(cluster) - redis0
            own = time.process_time() - own0
            total = max(ends) - start
            stats = [cluster.stats(i) for i in range(2)]
        finally:
            for proto in protos:
                if proto.transport is not None:
                    proto.transport.abort()
    recovered = sum(1 for p in protos if p.joined and p.joined.get("recovered") is True)
    exact = sum(1 for p in protos if p.messages == behind)
    each = [end - start for end in ends]
    print(f"recovery: {clients} roomcast.v1 clients reconnecting at once over 2 nodes, each "
          f"{behind} messages of {size} B behind, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{_lib.machine()}")
    print(f"recovered: {recovered}/{clients}; got exactly {behind} messages: {exact}/{clients}")
    print(f"time until all recovered: {total:.2f} s (per client p50 "
          f"{_lib.percentile(each, 0.5):.2f} s, p99 {_lib.percentile(each, 0.99):.2f} s; "
          f"upgraded p50 {_lib.percentile(upgraded, 0.5):.2f} s, p99 "
          f"{_lib.percentile(upgraded, 0.99):.2f} s)")
    print(f"node CPU: {cpu:.2f} s ({cpu / clients * 1e3:.2f} ms per client, "
          f"{cpu / (clients * behind) * 1e6:.1f} us per message replayed)")
    print(f"Redis CPU: {redis:.2f} s ({redis / clients * 1e3:.2f} ms per client); load "
          f"generator (this process) CPU: {own:.2f} s")
    for i, s in enumerate(stats):
        print(f"node {i}: " + ", ".join(f"{k}={s.get(k)}" for k in (
            "recoveries", "recoveries_failed", "messages_recovered")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--behind", type=int, default=100)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(run(args.clients, args.behind, args.size))


if __name__ == "__main__":
    main()
