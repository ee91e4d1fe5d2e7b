"""Cross-node fan-out on one Redis and on a 3-master Redis Cluster, side by side.

fanout.py's fan-out (one room of N members over 2 roomcast nodes, 64-byte text messages
from the first node, every member receives each one), measured by fanout.py's own code,
with two sets of nodes up at once that take turns each round: one on a private
redis-server (``redis://``, RedisBroker), one on a private local 3-master Redis Cluster
(``redis+cluster://``, RedisClusterBroker, sharded pub/sub).

Then the Redis side, which is what decides when one Redis is no longer enough: a
publish storm of ``--storm`` envelopes of the same size over 64 rooms, straight from one
broker to another (no WebSockets), reporting envelopes/s, Redis server CPU µs per
envelope (INFO cpu, summed over the masters) and how many masters carried them.

    python scripts/bench/cluster_fanout.py [--members 1000] [--messages 300] [--size 64]
                                           [--publishers 1] [--rounds 3] [--storm 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import _lib
import fanout
import redis

from roomcast.broker import create_broker
from roomcast.shared.envelope import Envelope, Kind
from roomcast.shared.ids import NodeId, Room
from tests.redis_cluster import LocalRedisCluster
from tests.redis_server import RedisServer


@dataclass
class Backend:
    """Where the nodes meet: a URL, and how to read the Redis masters' CPU and traffic."""

    name: str
    url: str
    masters: list[Callable[[], redis.Redis]]

    def published(self) -> list[int]:
        """PUBLISH+SPUBLISH calls seen by each master so far."""
        counts = []
        for make in self.masters:
            with make() as client:
                stats = client.info("commandstats")
            counts.append(sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0))
                              for c in ("publish", "spublish")))
        return counts

    def cpu(self) -> float:
        """user+sys CPU seconds of the masters (INFO cpu: microsecond resolution)."""
        total = 0.0
        for make in self.masters:
            with make() as client:
                info = client.info("cpu")
            total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        return total


@contextmanager
def single_redis() -> Iterator[Backend]:
    server = RedisServer().start()
    try:
        yield Backend("redis", server.url, [server.client])
    finally:
        server.cleanup()


@contextmanager
def redis_cluster() -> Iterator[Backend]:
    with LocalRedisCluster(masters=3) as local:
        masters = [functools.partial(local.client, p) for p in local.master_ports()]
        yield Backend("redis-cluster", local.url, masters)


async def fan_out(backends: list[Backend], members: int, messages: int, size: int,
                  publishers: int, rounds: int) -> list[fanout.FanoutResult]:
    """fanout.run's turns and bursts, with each set of nodes on one of ``backends``."""
    payload = (b"m" * size)[:-3] + b"end" if size >= 3 else b"m" * size
    setups: dict[str, fanout._Setup] = {}
    results = {b.name: fanout.FanoutResult(b.name) for b in backends}
    with contextlib.ExitStack() as stack:
        for backend in backends:
            # the bench node gets --redis "" (redis=False) then this URL: the last one wins
            nodes = stack.enter_context(
                _lib.Cluster("roomcast", extra=["--redis", backend.url], redis=False))
            half = members // 2
            clients = await _lib.connect("roomcast", nodes.ports[0], half, "fanout")
            stack.callback(_lib.close_all, clients)
            clients += await _lib.connect("roomcast", nodes.ports[1], members - half,
                                          "fanout")
            setups[backend.name] = fanout._Setup(nodes, clients)
        await asyncio.sleep(1.0)  # let subscriptions and presence settle
        names = [b.name for b in backends]
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                await fanout._burst(setups[name], results[name], members, messages,
                                    publishers, payload)
    return [results[b.name] for b in backends]


@dataclass
class Storm:
    name: str
    envelopes: int
    received: int
    seconds: float
    redis_cpu: float
    masters_used: int

    @property
    def rate(self) -> float:
        return self.received / self.seconds if self.seconds else 0.0

    @property
    def redis_us_per_envelope(self) -> float:
        return self.redis_cpu / self.envelopes * 1e6 if self.envelopes else float("nan")


async def storm(backend: Backend, envelopes: int, size: int, rooms: int = 64) -> Storm:
    """``envelopes`` publishes over ``rooms`` rooms from roomcast.broker a, all received by b."""
    got = 0
    done = asyncio.Event()

    def deliver(_: Envelope) -> None:
        nonlocal got
        got += 1
        if got >= envelopes:
            done.set()

    a = create_broker(backend.url, prefix="storm")
    b = create_broker(backend.url, prefix="storm")
    await a.start(NodeId("a"), lambda _: None)
    await b.start(NodeId("b"), deliver)
    try:
        names = [Room(f"room{i}") for i in range(rooms)]
        for room in names:
            await b.subscribe(room)
        payload = b"m" * size
        published0, cpu0 = backend.published(), backend.cpu()
        start = time.perf_counter()
        batch = 2000
        for first in range(0, envelopes, batch):
            await asyncio.gather(*(
                a.publish(Envelope(Kind.ROOM, names[i % rooms], payload, False, origin="a"))
                for i in range(first, min(envelopes, first + batch))
            ))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 60)
        seconds = time.perf_counter() - start
        cpu1, published1 = backend.cpu(), backend.published()
    finally:
        await a.close()
        await b.close()
    deltas = [y - x for x, y in zip(published0, published1, strict=True)]
    return Storm(backend.name, envelopes, got, seconds, cpu1 - cpu0,
                 sum(1 for d in deltas if d))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--publishers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--storm", type=int, default=50_000,
                        help="envelopes in the broker-to-broker publish storm (0: skip)")
    args = parser.parse_args()
    with single_redis() as one, redis_cluster() as three:
        results = asyncio.run(fan_out([one, three], args.members, args.messages, args.size,
                                      args.publishers, args.rounds))
        storms: dict[str, list[Storm]] = {one.name: [], three.name: []}
        for _ in range(args.rounds if args.storm else 0):
            for backend in (one, three):
                storms[backend.name].append(asyncio.run(storm(backend, args.storm, args.size)))
    print(f"fan-out: {args.members} members over 2 nodes, {args.messages} messages of "
          f"{args.size} B from {args.publishers} publisher(s), {args.rounds} rounds, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, {_lib.machine()}")
    fanout.report(results)
    if args.storm:
        print(f"publish storm: {args.storm} envelopes of {args.size} B over 64 rooms, one "
              f"broker to another, median of {args.rounds} runs")
        print(f"{'broker':<18}{'received/sent':>22}{'envelopes/s':>15}"
              f"{'Redis CPU us/env':>18}  masters used")
        for name, runs in storms.items():
            middle = statistics.median(r.rate for r in runs)
            run = min(runs, key=lambda r: abs(r.rate - middle))
            print(f"{name:<18}{f'{run.received}/{run.envelopes}':>22}{run.rate:>15,.0f}"
                  f"{run.redis_us_per_envelope:>18.2f}  {run.masters_used}")


if __name__ == "__main__":
    main()
