"""One node, many connections: idle memory, big-room broadcast, capacity.

Each server runs as one node with its private redis-server. Then, in order:

1. ``--idle`` connections (default 10,000) join one room and stay idle, keepalive pings
   on (every ``--ping-interval`` s, answered by the clients); after ``--hold`` s: RSS
   growth per connection over the node's RSS before the first connection, and the
   node's CPU while idle.
2. Big room: one member sends ``--big-messages`` messages, one at a time, into that
   room: time from the broadcast call to the last member's write (inside the node,
   where it can be measured: roomcast and the reference) and to the last receipt.
3. Capacity: more connections until ``--capacity`` (default: what the per-process
   file limit allows) or the first refusal: how many the node holds, how fast it
   accepted them, and its RSS.

    python scripts/bench/onenode.py [--servers roomcast,reference,socketio] [--idle 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time
from dataclasses import dataclass, field

import _lib

SOURCES = tuple(f"127.0.0.{i}" for i in range(1, 5))
"""Loopback source addresses for the clients, so ephemeral ports never run out."""


@dataclass
class OneNodeResult:
    server: str
    idle: int = 0
    idle_kb_per_conn: float = float("nan")
    idle_cpu_percent: float = float("nan")
    big_members: int = 0
    big_in_node_ms: list[float] = field(default_factory=list)
    big_receipt_ms: list[float] = field(default_factory=list)
    big_delivered: int = 0
    big_expected: int = 0
    held: int = 0
    target: int = 0
    accept_per_s: float = 0.0
    rss_mb: float = 0.0
    error: str = ""


def default_capacity() -> int:
    """What one process can hold here: its file limit less some room for the rest."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return min(soft, hard) - 1000


async def run(server: str, idle: int = 10_000, capacity: int = 0, hold: float = 6.0,
              ping_interval: float = 5.0, big_messages: int = 5) -> OneNodeResult:
    capacity = capacity or default_capacity()
    result = OneNodeResult(server, target=capacity)
    with _lib.Cluster(server, nodes=1, extra=["--ping-interval", str(ping_interval)]) as node:
        port = node.ports[0]
        await asyncio.sleep(1.0)
        rss0 = node.rss()
        clients: list[_lib.Client] = []
        try:
            # 1. idle memory with keepalive on
            clients += await _lib.connect(server, port, idle, "big", sources=SOURCES)
            result.idle = len(clients)
            await asyncio.sleep(1.0)
            cpu0 = node.cpu()
            await asyncio.sleep(hold)
            result.idle_cpu_percent = (node.cpu() - cpu0) / hold * 100
            result.idle_kb_per_conn = (node.rss() - rss0) / len(clients)

            # 2. big room: every member gets each message
            stamps: list[float] = []
            for c in clients:
                c.frames = 0
            result.big_members = len(clients)
            for _ in range(big_messages):
                before = sum(c.frames for c in clients)
                sent = time.perf_counter()
                clients[0].send_message(_lib.stamp_payload(64))
                got = await _lib.wait_for_count(clients, before + len(clients), stall=3.0)
                stamps.append(max(c.last for c in clients) - sent)
                result.big_delivered += got - before
                await asyncio.sleep(0.3)
            result.big_expected = big_messages * len(clients)
            result.big_receipt_ms = [s * 1e3 for s in stamps]
            timings = node.stats().get("broadcast_seconds", [])
            if not _lib.speaks_socketio(server) and isinstance(timings, list):
                result.big_in_node_ms = [t * 1e3 for t in timings[-big_messages:]]

            # 3. capacity: keep connecting in steps until the target or a failure
            start = time.perf_counter()
            step = 1000
            while len(clients) < capacity:
                want = min(step, capacity - len(clients))
                try:
                    clients += await _lib.connect(server, port, want, "big",
                                                  sources=SOURCES, handshake_timeout=30)
                except (OSError, RuntimeError, TimeoutError) as exc:
                    result.error = f"{type(exc).__name__}: {exc}"[:120]
                    break
            elapsed = time.perf_counter() - start
            await asyncio.sleep(1.0)
            result.held = sum(1 for c in clients if not c.closed)
            result.accept_per_s = (len(clients) - result.idle) / elapsed if elapsed else 0.0
            result.rss_mb = node.rss() / 1024
        finally:
            _lib.close_all(clients)
            await asyncio.sleep(0.5)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="roomcast,reference,socketio")
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--capacity", type=int, default=0,
                        help="connections to reach (default: per-process file limit - 1000)")
    parser.add_argument("--hold", type=float, default=6.0)
    parser.add_argument("--ping-interval", type=float, default=5.0)
    parser.add_argument("--big-messages", type=int, default=5)
    args = parser.parse_args()
    results = [asyncio.run(run(s, args.idle, args.capacity, args.hold, args.ping_interval,
                               args.big_messages))
               for s in args.servers.split(",")]
    print(f"one node: {args.idle} idle connections (pings every {args.ping_interval} s), "
          f"big room, capacity; {time.strftime('%Y-%m-%d %H:%M')}, {_lib.machine()}")
    for r in results:
        print(r)
        if r.big_in_node_ms:
            print(f"  big room in node: median {statistics.median(r.big_in_node_ms):.1f} ms")


if __name__ == "__main__":
    main()
