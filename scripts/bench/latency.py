"""Latency under load: a fixed publish rate into one room over 2 nodes, cross-node.

A publisher on the first node sends ``--rate`` stamped 64-byte messages per second for
``--seconds``; every member receives each one. All servers run at once and take turns,
``--rounds`` times. Reports p50/p99/max from publish to
receipt for the members on the *other* node (publisher's clock and receiver's clock
are the same: the load generator is one process), the delivered count, and node CPU
per delivery at that rate.

    python scripts/bench/latency.py [--members 1000] [--rate 50] [--seconds 4] [--rounds 2]
                                    [--servers reference,roomcast,socketio]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import _lib


@dataclass
class LatencyResult:
    """Every round of one server together."""

    server: str
    rate: int
    expected: int = 0
    delivered: int = 0
    cpu: float = 0.0
    stamps: list[float] = field(default_factory=list)
    local: list[float] = field(default_factory=list)
    """Receipts on the publisher's own node."""

    @property
    def us_per_delivery(self) -> float:
        return self.cpu / self.delivered * 1e6 if self.delivered else float("inf")

    def quantile(self, q: float) -> float:
        return _lib.percentile(self.stamps, q)

    @property
    def max(self) -> float:
        return max(self.stamps, default=float("nan"))


@dataclass
class _Setup:
    cluster: _lib.Cluster
    clients: list[_lib.Client]
    stamps: list[float]
    local: list[float]


async def _round(setup: _Setup, result: LatencyResult, members: int, seconds: float,
                 size: int) -> None:
    clients, rate = setup.clients, result.rate
    for c in clients:
        c.frames = 0
    setup.stamps.clear()
    setup.local.clear()
    count = int(rate * seconds)
    loop = asyncio.get_running_loop()
    cpu0 = setup.cluster.cpu()
    start = loop.time()
    for i in range(count):
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        clients[0].send_message(_lib.stamp_payload(size))
    delivered = await _lib.wait_for_count(clients, count * members, stall=2.0)
    result.cpu += setup.cluster.cpu() - cpu0
    result.expected += count * members
    result.delivered += delivered
    result.stamps += setup.stamps
    result.local += setup.local
    await asyncio.sleep(0.5)


async def run(servers: list[str], members: int = 1000, rate: int = 50, seconds: float = 4.0,
              size: int = 64, rounds: int = 2) -> list[LatencyResult]:
    """Start a cluster per server, then run ``rounds`` timed rounds on each in turn."""
    setups: dict[str, _Setup] = {}
    results = {s: LatencyResult(s, rate) for s in servers}
    with contextlib.ExitStack() as stack:
        for server in servers:
            cluster = stack.enter_context(_lib.Cluster(server, extra=_lib.KEEPALIVE))
            half = members // 2
            stamps: list[float] = []
            local: list[float] = []
            clients = await _lib.connect(server, cluster.ports[0], half, "fanout",
                                         stamps=local)
            stack.callback(_lib.close_all, clients)
            clients += await _lib.connect(server, cluster.ports[1], members - half, "fanout",
                                          stamps=stamps)
            setups[server] = _Setup(cluster, clients, stamps, local)
        await asyncio.sleep(1.0)
        for r in range(rounds):
            order = servers[r % len(servers):] + servers[:r % len(servers)]
            for server in order:
                await _round(setups[server], results[server], members, seconds, size)
    return [results[s] for s in servers]


def report(results: list[LatencyResult]) -> None:
    print(f"{'server':<12}{'delivered/expected':>22}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
          f"{'CPU us/delivery':>18}{'same-node p50/p99 ms':>23}")
    for r in results:
        same = (f"{_lib.percentile(r.local, 0.5) * 1e3:.1f} / "
                f"{_lib.percentile(r.local, 0.99) * 1e3:.1f}")
        print(f"{r.server:<12}{f'{r.delivered}/{r.expected}':>22}{r.quantile(0.5) * 1e3:>9.1f}"
              f"{r.quantile(0.99) * 1e3:>9.1f}{r.max * 1e3:>9.1f}{r.us_per_delivery:>18.2f}"
              f"{same:>23}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=50, help="messages per second")
    parser.add_argument("--seconds", type=float, default=4.0, help="per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--servers", default="reference,roomcast,socketio")
    args = parser.parse_args()
    results = asyncio.run(run(args.servers.split(","), args.members, args.rate, args.seconds,
                              rounds=args.rounds))
    print(f"latency: {args.members} members over 2 nodes, {args.rate} msg/s "
          f"({args.rate * args.members:,} deliveries/s), {args.rounds} rounds of "
          f"{args.seconds} s, cross-node, {time.strftime('%Y-%m-%d %H:%M')}, {_lib.machine()}")
    report(results)


if __name__ == "__main__":
    main()
