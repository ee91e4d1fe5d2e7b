"""What room history costs a fan-out: history on against off, in one run.

One room of ``--members`` members over 2 nodes (scripts/bench/history_node.py, one
private redis-server per cluster); one member on the first node sends ``--messages``
text messages of ``--size`` bytes, all at once, and every member (the sender too) must
receive each one. Two clusters are up together and take turns, ``--rounds`` times:
``off`` (no history) and ``on`` (``--history-size``, every room). Members speak
``roomcast.v1`` (framed messages; with history, each carries its position), or raw
messages with ``--raw``. Reports per mode: delivered/expected, deliveries per second,
node CPU microseconds per delivery (user+sys of both nodes from /proc), Redis CPU
microseconds per publish (``INFO cpu``, less Redis' idle CPU measured over a quiet second
before each burst; gross as well), medians over the rounds, and the ratios on/off.

    python scripts/bench/history_fanout.py [--members 1000] [--messages 300] [--size 64]
                                           [--rounds 3] [--history-size 100] [--raw]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import _lib

_lib.SERVERS["history"] = Path(__file__).resolve().parent / "history_node.py"

IDLE_SAMPLE = 1.0
"""Seconds of quiet before each burst over which Redis' idle CPU is measured."""
V1_HEADER = b"Sec-WebSocket-Protocol: roomcast.v1\r\n"


class V1Client(_lib.Client):
    """The benchmark client, offering the roomcast.v1 subprotocol."""

    def __init__(self, host: str, path: str, ready: asyncio.Future[None]) -> None:
        super().__init__(host, path, ready)
        self.request = self.request[:-2] + V1_HEADER + b"\r\n"


async def connect(port: int, count: int, path: str, *, v1: bool,
                  concurrency: int = 200) -> list[_lib.Client]:
    """``count`` clients on ``path``, each ready (upgraded) when this returns."""
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    kind = V1Client if v1 else _lib.Client
    host = f"127.0.0.1:{port}"

    async def one() -> _lib.Client:
        async with sem:
            ready: asyncio.Future[None] = loop.create_future()
            _, proto = await loop.create_connection(lambda: kind(host, path, ready),
                                                    "127.0.0.1", port)
            await asyncio.wait_for(ready, 60)
            return proto

    return list(await asyncio.gather(*(one() for _ in range(count))))


def redis_cpu(cluster: _lib.Cluster) -> float:
    """user+sys CPU seconds of the cluster's redis-server (``INFO cpu``)."""
    assert cluster.redis_server is not None
    with cluster.redis_server.client() as client:
        info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@dataclass
class Result:
    mode: str
    expected: int = 0
    delivered: int = 0
    seconds: float = 0.0
    node_us: list[float] = field(default_factory=list)
    redis_us: list[float] = field(default_factory=list)
    redis_gross_us: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0

    @property
    def node(self) -> float:
        return statistics.median(self.node_us) if self.node_us else float("inf")

    @property
    def redis(self) -> float:
        return statistics.median(self.redis_us) if self.redis_us else float("inf")

    @property
    def redis_gross(self) -> float:
        return statistics.median(self.redis_gross_us) if self.redis_gross_us else float("inf")


async def burst(cluster: _lib.Cluster, clients: list[_lib.Client], result: Result,
                messages: int, payload: bytes) -> None:
    for c in clients:
        c.frames = 0
    expected = messages * len(clients)
    # Redis' own idle CPU (cron, the nodes' presence beats) over a quiet second, taken
    # off what the burst used: a burst lasts seconds, its publishes cost microseconds
    idle0, idle_at = redis_cpu(cluster), time.perf_counter()
    await asyncio.sleep(IDLE_SAMPLE)
    idle_rate = (redis_cpu(cluster) - idle0) / (time.perf_counter() - idle_at)
    cpu0, redis0 = cluster.cpu(), redis_cpu(cluster)
    start = time.perf_counter()
    for _ in range(messages):
        clients[0].send_message(payload)
    delivered = await _lib.wait_for_count(clients, expected, stall=5.0)
    end = max(c.last for c in clients)
    cpu, redis = cluster.cpu() - cpu0, redis_cpu(cluster) - redis0
    result.expected += expected
    result.delivered += delivered
    result.seconds += end - start
    result.node_us.append(cpu / delivered * 1e6 if delivered else float("inf"))
    busy = time.perf_counter() - start
    result.redis_gross_us.append(redis / messages * 1e6)
    result.redis_us.append(max(0.0, redis - idle_rate * busy) / messages * 1e6)


async def run(members: int, messages: int, size: int, rounds: int, history_size: int,
              v1: bool) -> list[Result]:
    payload = (b"m" * size)[:-3] + b"end"
    modes = {"off": 0, "on": history_size}
    setups: dict[str, tuple[_lib.Cluster, list[_lib.Client]]] = {}
    results = {mode: Result(mode) for mode in modes}
    with contextlib.ExitStack() as stack:
        for mode, hsize in modes.items():
            cluster = stack.enter_context(_lib.Cluster(
                "history", extra=["--history-size", str(hsize), "--ping-interval", "25"]))
            half = members // 2
            clients = await connect(cluster.ports[0], half, "/bench?room=fanout", v1=v1)
            stack.callback(_lib.close_all, clients)
            clients += await connect(cluster.ports[1], members - half, "/bench?room=fanout",
                                     v1=v1)
            setups[mode] = (cluster, clients)
        await asyncio.sleep(1.0)  # let subscriptions and presence settle
        names = list(modes)
        for r in range(rounds):
            for mode in names[r % 2:] + names[:r % 2]:
                cluster, clients = setups[mode]
                await burst(cluster, clients, results[mode], messages, payload)
    return list(results.values())


def report(results: list[Result]) -> None:
    print(f"{'history':<9}{'delivered/expected':>22}{'deliveries/s':>15}"
          f"{'node CPU us/delivery':>23}{'Redis CPU us/publish':>23}{'(gross)':>10}")
    for r in results:
        print(f"{r.mode:<9}{f'{r.delivered}/{r.expected}':>22}{r.rate:>15,.0f}"
              f"{r.node:>23.2f}{r.redis:>23.1f}{r.redis_gross:>10.1f}")
        print(f"{'':<9}rounds: node {' '.join(f'{u:.2f}' for u in r.node_us)}; "
              f"redis {' '.join(f'{u:.1f}' for u in r.redis_us)}")
    off, on = results
    print(f"node CPU per delivery, on/off = {on.node / off.node:.2f}x (target <= 1.15x)")
    print(f"Redis CPU per publish, on/off = {on.redis / off.redis:.2f}x (idle CPU taken "
          f"off; gross {on.redis_gross / off.redis_gross:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--history-size", type=int, default=100)
    parser.add_argument("--raw", action="store_true",
                        help="members without roomcast.v1 (raw messages, no positions)")
    args = parser.parse_args()
    results = asyncio.run(run(args.members, args.messages, args.size, args.rounds,
                              args.history_size, not args.raw))
    print(f"history fan-out: {args.members} {'raw' if args.raw else 'roomcast.v1'} members "
          f"over 2 nodes, {args.messages} messages of {args.size} B from 1 sender, "
          f"history size {args.history_size}, {args.rounds} rounds, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, {_lib.machine()}")
    report(results)


if __name__ == "__main__":
    main()
