"""Cross-node fan-out: one room of N members over 2 nodes, 64-byte text messages.

``--publishers`` members on the first node (1 by default, as in PERFORMANCE.md) send
``--messages`` messages between them, all at once, as fast as the server takes them;
every member (the publishers too) must receive each one. All servers run at once and
take turns, ``--rounds`` times. Reports per server: delivered/expected, deliveries per
second, and node CPU microseconds per delivery (user+sys of the node processes from
/proc, divided by deliveries; the median over the rounds).

    python scripts/bench/fanout.py [--members 1000] [--messages 300] [--size 64]
                                   [--servers reference,roomcast,socketio,roomcast+deflate]
                                   [--publishers 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from dataclasses import dataclass, field

import _lib


@dataclass
class FanoutResult:
    """Totals over every round of one server."""

    server: str
    expected: int = 0
    delivered: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    rounds_us: list[float] = field(default_factory=list)
    compressed: int = 0

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0

    @property
    def us_per_delivery(self) -> float:
        """Median over the rounds of node CPU µs per delivery."""
        return statistics.median(self.rounds_us) if self.rounds_us else float("inf")


@dataclass
class _Setup:
    cluster: _lib.Cluster
    clients: list[_lib.Client]


async def _burst(setup: _Setup, result: FanoutResult, members: int, messages: int,
                 publishers: int, payload: bytes) -> None:
    clients = setup.clients
    for c in clients:
        c.frames = c.compressed = 0
    expected = messages * members
    cpu0 = setup.cluster.cpu()
    start = time.perf_counter()
    for i in range(messages):
        clients[i % publishers].send_message(payload)
    delivered = await _lib.wait_for_count(clients, expected)
    end = max(c.last for c in clients)
    cpu = setup.cluster.cpu() - cpu0
    result.expected += expected
    result.delivered += delivered
    result.seconds += end - start
    result.cpu += cpu
    result.rounds_us.append(cpu / delivered * 1e6 if delivered else float("inf"))
    result.compressed += sum(c.compressed for c in clients)
    await asyncio.sleep(0.3)


async def run(servers: list[str], members: int = 1000, messages: int = 300, size: int = 64,
              *, publishers: int = 1, rounds: int = 3,
              compression: bool = False) -> list[FanoutResult]:
    """Start a cluster per server, then burst into each in turn, ``rounds`` times.

    All clusters are up together and take turns, so a change in the machine's load
    during the run hits every server alike. Each server name may end in ``+deflate``
    (permessage-deflate on in the server, offered by the clients).
    """
    payload = (b"m" * size)[:-3] + b"end" if size >= 3 else b"m" * size
    setups: dict[str, _Setup] = {}
    results = {s: FanoutResult(s) for s in servers}
    with contextlib.ExitStack() as stack:
        for server in servers:
            kind, _, option = server.partition("+")
            deflate = compression or option == "deflate"
            extra = [*_lib.KEEPALIVE, *(["--compression"] if deflate else [])]
            cluster = stack.enter_context(_lib.Cluster(kind, extra=extra))
            half = members // 2
            clients = await _lib.connect(kind, cluster.ports[0], half, "fanout",
                                         deflate=deflate)
            stack.callback(_lib.close_all, clients)
            clients += await _lib.connect(kind, cluster.ports[1], members - half, "fanout",
                                          deflate=deflate)
            setups[server] = _Setup(cluster, clients)
        await asyncio.sleep(1.0)  # let subscriptions and presence settle
        for r in range(rounds):
            order = servers[r % len(servers):] + servers[:r % len(servers)]
            for server in order:
                await _burst(setups[server], results[server], members, messages,
                             publishers, payload)
    return [results[s] for s in servers]


def report(results: list[FanoutResult]) -> None:
    print(f"{'server':<18}{'delivered/expected':>22}{'deliveries/s':>15}"
          f"{'CPU us/delivery':>18}  rounds")
    for r in results:
        rounds = " ".join(f"{u:.2f}" for u in r.rounds_us)
        print(f"{r.server:<18}{f'{r.delivered}/{r.expected}':>22}{r.rate:>15,.0f}"
              f"{r.us_per_delivery:>18.2f}  {rounds}")
    by = {r.server: r for r in results}
    for other in ("reference", "socketio", "socketio-node"):
        if other in by and "roomcast" in by:
            ratio = by[other].us_per_delivery / by["roomcast"].us_per_delivery
            print(f"{other} CPU per delivery = {ratio:.2f} x roomcast")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--publishers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--servers", default="reference,roomcast")
    parser.add_argument("--compression", action="store_true",
                        help="permessage-deflate on for every server (clients offer it); "
                             "or name a server roomcast+deflate")
    args = parser.parse_args()
    results = asyncio.run(run(args.servers.split(","), args.members, args.messages, args.size,
                              publishers=args.publishers, rounds=args.rounds,
                              compression=args.compression))
    print(f"fan-out: {args.members} members over 2 nodes, {args.messages} messages of "
          f"{args.size} B from {args.publishers} publisher(s), {args.rounds} rounds, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, {_lib.machine()}")
    report(results)


if __name__ == "__main__":
    main()
