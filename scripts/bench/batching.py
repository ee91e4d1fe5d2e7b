"""Write batching: node CPU per delivery and latency with ``--write-delay-ms`` vs none.

Three measurements, one run:

1. **The send floor**: a tight loop of 66-byte ``send()`` calls on loopback TCP (the
   frame of a 64-byte message), each to the next of ``--floor-sockets`` connections
   whose readers run in another process; CPU (user+sys) of the sending process per
   send. A node that writes once per message per member cannot go below it. The same
   loop with ``--floor-batch`` frames joined into each send shows the cost per frame
   once writes carry several.
2. **Dense** (when it pays): ``--members`` members of one room over 2 roomcast nodes, a
   publisher on the first node sends ``--rate`` stamped messages of 64 B a second for
   ``--seconds`` (each rate of ``--rate`` in turn: at the second, lower one no variant
   is saturated, so latencies compare); every member receives each one. One cluster
   without a delay and one with ``--write-delay-ms`` (per event loop of ``--loops``) are
   up at once and take turns, ``--rounds`` times. Reports
   delivered/expected, node CPU µs per delivery (median of rounds), frames per client
   read (how many frames a write carried), and publish-to-receipt latency on the other
   node (p50/p99/max).
3. **Sparse** (when it does not): ``--sparse-rooms`` rooms of 2 members (one on each
   node), each room getting one message a second for ``--seconds``: a connection gets
   at most one message per delay, so there is nothing to collect and the delay only
   adds latency.

    python scripts/bench/batching.py [--delay 10] [--members 200] [--rate 500,100]
                                     [--seconds 5] [--rounds 2] [--sparse-rooms 200]
                                     [--loops asyncio,uvloop]

Every variant runs on each event loop of ``--loops`` (both by default), in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import selectors
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field

import _lib
import inbound

FRAME = b"\x81\x40" + b"x" * 64
"""A 64-byte text frame from a server: 66 bytes on the wire."""


# -- the send floor ----------------------------------------------------------------------


def send_floor(sockets: int = 200, passes: int = 500, frames_per_send: int = 1) -> float:
    """CPU µs per frame of ``passes`` rounds of one send to each of ``sockets`` loopback
    TCP connections, ``frames_per_send`` 66-byte frames in each send."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    senders: list[socket.socket] = []
    readers: list[socket.socket] = []
    try:
        for _ in range(sockets):
            client = socket.create_connection(("127.0.0.1", port))
            server, _ = listener.accept()
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            senders.append(server)
            readers.append(client)
    finally:
        listener.close()
    pid = os.fork()
    if pid == 0:  # the readers: drain every connection until all are closed
        try:
            for sock in senders:
                sock.close()
            sel = selectors.DefaultSelector()
            for sock in readers:
                sel.register(sock, selectors.EVENT_READ)
            open_count = len(readers)
            while open_count:
                for key, _ in sel.select():
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if not sock.recv(65536):
                        sel.unregister(sock)
                        sock.close()
                        open_count -= 1
        finally:
            os._exit(0)
    for sock in readers:
        sock.close()
    data = FRAME * frames_per_send
    try:
        before = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(passes):
            for sock in senders:
                sock.send(data)
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        for sock in senders:
            sock.close()
        os.waitpid(pid, 0)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu / (passes * sockets * frames_per_send) * 1e6


# -- the workloads -----------------------------------------------------------------------


@dataclass
class Result:
    """Every round of one variant together."""

    name: str
    expected: int = 0
    delivered: int = 0
    reads: int = 0
    rounds_us: list[float] = field(default_factory=list)
    remote: list[float] = field(default_factory=list)
    """Publish-to-receipt seconds on the node the publisher is not on."""
    local: list[float] = field(default_factory=list)

    @property
    def us_per_delivery(self) -> float:
        return statistics.median(self.rounds_us) if self.rounds_us else float("inf")

    @property
    def frames_per_read(self) -> float:
        return self.delivered / self.reads if self.reads else float("nan")


@dataclass
class _Setup:
    cluster: _lib.Cluster
    clients: list[_lib.Client]
    publishers: list[_lib.Client]
    remote: list[float]
    local: list[float]


async def _round(setup: _Setup, result: Result, per_message: int, rate: float,
                 seconds: float) -> None:
    """``rate`` messages a second for ``seconds``, the publishers taking turns; each
    message reaches ``per_message`` members."""
    clients, publishers = setup.clients, setup.publishers
    for c in clients:
        c.frames = c.reads = 0
    setup.remote.clear()
    setup.local.clear()
    count = int(rate * seconds)
    loop = asyncio.get_running_loop()
    label = f"{result.name.replace(', ', '-').replace(' ', '')}-{rate:g}-r{len(result.rounds_us)}"
    async with setup.cluster.profiled(label):  # BENCH_PROFILE: py-spy samples the round
        cpu0 = setup.cluster.cpu()
        start = loop.time()
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            publishers[i % len(publishers)].send_message(_lib.stamp_payload(64))
        delivered = await _lib.wait_for_count(clients, count * per_message, stall=2.0)
        cpu = setup.cluster.cpu() - cpu0
    if os.environ.get("BENCH_PROFILE"):
        print(f"  [{label}: {delivered} deliveries, {cpu:.3f} s node CPU]", file=sys.stderr)
    result.expected += count * per_message
    result.delivered += delivered
    result.reads += sum(c.reads for c in clients)
    result.rounds_us.append(cpu / delivered * 1e6 if delivered else float("inf"))
    result.remote += setup.remote
    result.local += setup.local
    await asyncio.sleep(0.5)


async def run(variants: dict[str, list[str]], *, rooms: int, per_room: int, rate: float,
              seconds: float, rounds: int) -> list[Result]:
    """Start a cluster per variant (extra node arguments), ``rooms`` rooms of
    ``per_room`` members split over the 2 nodes (the first member of each room, on the
    first node, publishes), then ``rounds`` rounds with the variants taking turns."""
    setups: dict[str, _Setup] = {}
    results = {name: Result(name) for name in variants}
    with contextlib.ExitStack() as stack:
        for name, extra in variants.items():
            cluster = stack.enter_context(_lib.Cluster("roomcast",
                                                       extra=[*_lib.KEEPALIVE, *extra],
                                                       profile_windows=True))
            remote: list[float] = []
            local: list[float] = []
            clients: list[_lib.Client] = []
            publishers: list[_lib.Client] = []
            first = (per_room + 1) // 2
            sides = await asyncio.gather(*(
                _lib.connect("roomcast", port, count, f"room{r}", stamps=stamps,
                             concurrency=50)
                for r in range(rooms)
                for port, count, stamps in ((cluster.ports[0], first, local),
                                            (cluster.ports[1], per_room - first, remote))
            ))
            for here, there in zip(sides[::2], sides[1::2], strict=True):
                stack.callback(_lib.close_all, here)
                stack.callback(_lib.close_all, there)
                publishers.append(here[0])
                clients += here + there
            setups[name] = _Setup(cluster, clients, publishers, remote, local)
        await asyncio.sleep(1.0)  # let subscriptions and presence settle
        names = list(variants)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                await _round(setups[name], results[name], per_room, rate, seconds)
    return [results[name] for name in variants]


def _ms(values: list[float], q: float) -> str:
    return f"{_lib.percentile(values, q) * 1e3:.1f}"


def _base(results: list[Result], r: Result) -> Result:
    """The no-delay result on the loop of ``r``."""
    loop = r.name.split(",")[0]
    return next(b for b in results if b.name == f"{loop}, no delay")


def table(results: list[Result], floor: float) -> None:
    print("| variant | delivered / expected | CPU µs per delivery (median; rounds) | "
          "vs no delay | vs send floor | frames per client read | p50 ms | p99 ms | "
          "max ms | same node p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rounds = ", ".join(f"{u:.2f}" for u in r.rounds_us)
        base = _base(results, r)
        print(f"| {r.name} | {r.delivered:,} / {r.expected:,} | **{r.us_per_delivery:.2f}** "
              f"({rounds}) | {r.us_per_delivery / base.us_per_delivery:.2f}x | "
              f"{r.us_per_delivery / floor:.2f}x | {r.frames_per_read:.1f} | "
              f"{_ms(r.remote, 0.5)} | {_ms(r.remote, 0.99)} | "
              f"{max(r.remote, default=float('nan')) * 1e3:.1f} | "
              f"{_ms(r.local, 0.5)} / {_ms(r.local, 0.99)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay", type=int, default=10, help="--write-delay-ms to compare")
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--rate", default="500,100",
                        help="dense: messages per second, comma-separated for several runs "
                             "(a lower rate compares latency where no variant is saturated)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sparse-rooms", type=int, default=200,
                        help="sparse: rooms of 2 members, 1 message/s each (0: skip)")
    parser.add_argument("--floor-sockets", type=int, default=200)
    parser.add_argument("--floor-batch", type=int, default=10)
    parser.add_argument("--loops", default="asyncio,uvloop",
                        help="event loops of the nodes, each variant on each")
    args = parser.parse_args()
    loops = args.loops.split(",")
    if not loops or set(loops) - {"asyncio", "uvloop"}:
        parser.error("--loops: a comma-separated subset of asyncio,uvloop")
    load0 = os.getloadavg()
    floor = statistics.median(send_floor(args.floor_sockets) for _ in range(3))
    floor_batched = statistics.median(send_floor(args.floor_sockets,
                                                 frames_per_send=args.floor_batch)
                                      for _ in range(3))
    variants: dict[str, list[str]] = {}
    for loop in loops:
        variants[f"{loop}, no delay"] = ["--loop", loop]
        variants[f"{loop}, delay {args.delay} ms"] = ["--loop", loop, "--write-delay-ms",
                                                     str(args.delay)]
    rates = [float(r) for r in args.rate.split(",")]
    dense = {rate: asyncio.run(run(variants, rooms=1, per_room=args.members, rate=rate,
                                   seconds=args.seconds, rounds=args.rounds))
             for rate in rates}
    sparse = (asyncio.run(run(variants, rooms=args.sparse_rooms, per_room=2,
                              rate=args.sparse_rooms, seconds=args.seconds,
                              rounds=args.rounds)) if args.sparse_rooms else [])
    load1 = os.getloadavg()
    print(f"# write batching, {time.strftime('%Y-%m-%d %H:%M %Z')}\n")
    print(f"Commit {inbound.revision()}. Machine: {_lib.machine()}; event loops of the "
          f"nodes: {', '.join(loops)}. Load average (1/5/15 min) {load0[0]:.2f} / {load0[1]:.2f} / "
          f"{load0[2]:.2f} before, {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f} after.")
    print(f"\nSend floor: {floor:.2f} µs of CPU per 66-byte loopback send (tight loop over "
          f"{args.floor_sockets} connections, median of 3); {floor_batched:.2f} µs per frame "
          f"with {args.floor_batch} frames in each send.")
    for rate, results in dense.items():
        _dense_report(args, rate, results, floor)
    if sparse:
        print(f"\n### Sparse: {args.sparse_rooms} rooms of 2 members (one per node), 1 msg/s "
              f"each for {args.seconds:g} s, {args.rounds} rounds\n")
        table(sparse, floor)


def _dense_report(args: argparse.Namespace, rate: float, results: list[Result],
                  floor: float) -> None:
    print(f"\n### Dense: {args.members} members over 2 nodes, {rate:g} msg/s of 64 B for "
          f"{args.seconds:g} s ({rate * args.members:,.0f} deliveries/s), "
          f"{args.rounds} rounds\n")
    table(results, floor)
    print()
    for batched in results:
        if batched.name.endswith("no delay"):
            continue
        base = _base(results, batched)
        ratio = batched.us_per_delivery / base.us_per_delivery
        print(f"- {batched.name}: CPU per delivery {ratio:.2f}x of no delay (target <= 0.40x), "
              f"{batched.us_per_delivery / floor:.2f}x the send floor (target < 1); p99 "
              f"{_ms(batched.remote, 0.99)} ms vs {_ms(base.remote, 0.99)} ms without the "
              f"delay (target: at most 12 ms more).")
    print(f"- Loss: {sum(r.expected - r.delivered for r in results):,} deliveries.")


if __name__ == "__main__":
    main()
