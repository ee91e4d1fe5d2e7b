"""Redis CPU per publish with room history on and off, side by side in one run.

Two brokers (two nodes) subscribe to 64 rooms; one of them publishes ``--publishes``
envelopes of ``--size`` bytes over those rooms, pipelined ``--batch`` at a time, and
both receive every one (the publisher gets its own history echo, as a node does). The
Redis server's CPU (``INFO cpu``, user+sys, summed over the masters) before and after
gives Redis CPU per publish. Modes, taking turns each round (median of ``--rounds``):

- ``off``: no history, one PUBLISH (SPUBLISH) per message, as before issue 12;
- ``on``: the history script (EVALSHA): next offset, XADD with exact MAXLEN and MINID
  trimming, the PUBLISH, the meta hash; on one server the publish link passes the run
  id it read at connect, so the script reads only ``INFO replication``;
- ``on, INFO server``: the same script reading the run id itself (``INFO server``), as
  it does for reads and on a cluster (one server only: on a cluster ``on`` is this).

    python scripts/bench/history_redis.py [--publishes 20000] [--size 64] [--rounds 3]
                                          [--history-size 100] [--no-cluster]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from dataclasses import dataclass

import _lib
from cluster_fanout import Backend, redis_cluster, single_redis

from roomcast.broker import RedisBroker
from roomcast.shared.envelope import Envelope, Kind
from roomcast.shared.history import History
from roomcast.shared.ids import NodeId, Room

ROOMS = 64


@dataclass
class Run:
    backend: str
    mode: str
    publishes: int
    received: int
    seconds: float
    redis_cpu: float
    python_cpu: float

    @property
    def redis_us(self) -> float:
        return self.redis_cpu / self.publishes * 1e6

    @property
    def python_us(self) -> float:
        return self.python_cpu / self.publishes * 1e6


async def run(backend: Backend, mode: str, publishes: int, size: int, batch: int,
              history_size: int, round_no: int) -> Run:
    """One round of ``mode``: ``publishes`` envelopes from node a, received by a and b."""
    history = None if mode == "off" else History(size=history_size, ttl=300)
    got = 0
    target = 0
    reached = asyncio.Event()

    def deliver(_: Envelope) -> None:
        nonlocal got
        got += 1
        if got >= target:
            reached.set()

    async def received(count: int, seconds: float) -> None:
        """Wait until ``count`` envelopes in all were delivered (or ``seconds`` passed)."""
        nonlocal target
        target = count
        reached.clear()
        if got < count:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reached.wait(), seconds)

    prefix = f"hb{round_no}{mode.replace(' ', '').replace(',', '')}"
    a = RedisBroker(backend.url, prefix=prefix)
    b = RedisBroker(backend.url, prefix=prefix)
    if mode == "on, INFO server":
        a._history.pass_run_id = False
    await a.start(NodeId("a"), deliver if history else lambda _: None)
    await b.start(NodeId("b"), deliver)
    # a node ignores its own echo of a plain publish; with history both nodes get it
    expected = publishes if history is None else 2 * publishes
    try:
        rooms = [Room(f"room{i}") for i in range(ROOMS)]
        for room in rooms:
            await a.subscribe(room)
            await b.subscribe(room)
        payload = b"m" * size
        if history is not None:  # scripts loaded and durability read before measuring
            await asyncio.gather(*(a.publish(Envelope(Kind.ROOM, r, payload, False, "a"),
                                             history=history) for r in rooms))
            await received(2 * ROOMS, 30)
            expected += 2 * ROOMS
        cpu0, py0 = backend.cpu(), time.process_time()
        start = time.perf_counter()
        for first in range(0, publishes, batch):
            await asyncio.gather(*(
                a.publish(Envelope(Kind.ROOM, rooms[i % ROOMS], payload, False, origin="a"),
                          history=history)
                for i in range(first, min(publishes, first + batch))
            ))
        await received(expected, 120)
        seconds = time.perf_counter() - start
        cpu1, py1 = backend.cpu(), time.process_time()
    finally:
        await a.close()
        await b.close()
    received = got - (2 * ROOMS if history is not None else 0)
    return Run(backend.name, mode, publishes, received, seconds, cpu1 - cpu0, py1 - py0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--publishes", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--history-size", type=int, default=100)
    parser.add_argument("--no-cluster", action="store_true")
    args = parser.parse_args()
    results: dict[tuple[str, str], list[Run]] = {}
    with single_redis() as one:
        plans = [(one, ("off", "on", "on, INFO server"))]
        if args.no_cluster:
            runs_for(plans, args, results)
        else:
            with redis_cluster() as three:
                plans.append((three, ("off", "on")))
                runs_for(plans, args, results)
    print(f"Redis CPU per publish, history on vs off: {args.publishes} publishes of "
          f"{args.size} B over {ROOMS} rooms, 2 subscribed nodes, pipelined {args.batch} at "
          f"a time, history size {args.history_size}; median of {args.rounds} rounds; "
          f"{time.strftime('%Y-%m-%d %H:%M')}, {_lib.machine()}\n")
    print("| Redis | mode | received/expected | Redis CPU µs/publish | vs off "
          "| publisher process CPU µs/publish |")
    print("|---|---|---|---|---|---|")
    for (backend, mode), runs in results.items():
        run_ = sorted(runs, key=lambda r: r.redis_us)[len(runs) // 2]
        off = statistics.median(r.redis_us for r in results[(backend, "off")])
        expected = run_.publishes * (2 if mode != "off" else 1)
        print(f"| {backend} | {mode} | {run_.received}/{expected} | {run_.redis_us:.2f} "
              f"| {run_.redis_us / off:.2f}x | {run_.python_us:.1f} |")


def runs_for(plans: list[tuple[Backend, tuple[str, ...]]], args: argparse.Namespace,
             results: dict[tuple[str, str], list[Run]]) -> None:
    for r in range(args.rounds):
        for backend, modes in plans:
            turn = modes[r % len(modes):] + modes[:r % len(modes)]
            for mode in turn:
                result = asyncio.run(run(backend, mode, args.publishes, args.size,
                                         args.batch, args.history_size, r))
                results.setdefault((backend.name, mode), []).append(result)


if __name__ == "__main__":
    main()
