"""Inbound: many clients send to one node whose handler only counts the messages.

Each server runs as one node with its private redis-server and a sink route (started
with ``--sink``): roomcast an ``EventHandler`` whose ``on_message`` only counts,
the reference node an aiohttp ``WebSocketResponse`` receive loop that only counts,
python-socketio a ``sink`` event handler that only counts. No room, no broadcast: what
is measured is reading, unmasking, (inflating,) decoding and handing over messages.

``--clients`` clients (200) on loopback each send ``--messages`` text messages (500)
of each ``--sizes`` (64 B and 16 KB) at once, as fast as the node takes them. The
frames are masked and built once; each client writes them many per
``transport.write`` (about 64 KB at a time), all clients in turn, respecting each
socket's flow control, so the load generator is not what limits the rate (its own
CPU is reported alongside). All servers are up together and take turns, ``--rounds``
times. ``roomcast`` or ``reference`` may end in ``+deflate``: its clients offer
permessage-deflate and send every message compressed (RSV1, a fresh zlib context per
message, i.e. no context takeover); roomcast then runs with compression enabled.

Reported per server and size: messages the node counted / sent, messages per second
(from the first write to when the node's count last moved, noted by a 5 ms timer in
the node that each /stats read arms), node CPU µs per message (user+sys of the node
process from /proc divided by messages; the median over the rounds), and node and
load-generator CPU as a share of the wall time (a node near 100% is saturated; a
generator near 100% would mean the generator limits the rate), and the node's worst
event-loop lag in any round (how late its 5 ms timer ran: how long everything else on
that node, other sockets and Redis replies, may wait behind a burst). Socket.IO messages
carry the payload as a JSON string in a ``42["sink","..."]`` packet, 12 bytes more.

    python scripts/bench/inbound.py [--servers roomcast,reference,socketio,
                                     roomcast+deflate,reference+deflate]
                                    [--clients 200] [--messages 500] [--sizes 64,16384]
                                    [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import statistics
import subprocess
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import _lib

SERVERS = ("roomcast", "reference", "socketio", "socketio-node", "roomcast+deflate",
           "reference+deflate")
SIZES = (64, 16 * 1024)
CHUNK = 64 * 1024
"""Bytes of frames a client hands to one ``transport.write`` (at least one frame)."""
POLL = 0.2
"""Seconds between /stats reads while waiting for the node to count everything (one
read costs the node 0.5-0.9 ms of CPU here, so polling adds under 0.5% to its CPU)."""
STALL = 5.0
"""Seconds without progress after which a burst is over, whatever was counted."""
WORDS = (b"room cast node hub redis frame socket client server message event user chat "
         b"alpha beta gamma delta join leave send text").split()


@dataclass
class InboundResult:
    """Totals over every round of one server at one size."""

    server: str
    size: int
    wire: int = 0
    """Bytes of one frame on the wire (header, mask and payload, compressed or not)."""
    expected: int = 0
    received: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    generator_cpu: float = 0.0
    rounds_us: list[float] = field(default_factory=list)
    rounds_rate: list[float] = field(default_factory=list)
    lag: float = 0.0
    """The node's worst event-loop lag in any round, seconds (see Sink in the nodes)."""
    closed: int = 0

    @property
    def us_per_message(self) -> float:
        """Median over the rounds of node CPU µs per message counted."""
        return statistics.median(self.rounds_us) if self.rounds_us else float("inf")

    @property
    def rate(self) -> float:
        """Median over the rounds of messages per second."""
        return statistics.median(self.rounds_rate) if self.rounds_rate else 0.0

    @property
    def node_percent(self) -> float:
        return self.cpu / self.seconds * 100 if self.seconds else 0.0

    @property
    def generator_percent(self) -> float:
        return self.generator_cpu / self.seconds * 100 if self.seconds else 0.0


def text_payload(size: int) -> bytes:
    """``size`` bytes of ASCII words and numbers (the same for a given size): text that
    compresses about as well as chat or JSON does, and is a valid JSON string."""
    rng = random.Random(size)
    out = bytearray()
    while len(out) < size:
        out += rng.choice(WORDS) + b" " + str(rng.randrange(100_000)).encode() + b" "
    return bytes(out[:size])


def deflate(payload: bytes) -> bytes:
    """permessage-deflate body of one message with a fresh context (no takeover)."""
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    body = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return body[:-4] if body.endswith(b"\x00\x00\xff\xff") else body


def client_frame(kind: str, size: int, compressed: bool) -> bytes:
    """The masked frame every client of ``kind`` sends, built once."""
    payload = text_payload(size)
    if _lib.speaks_socketio(kind):
        payload = b'42["sink","' + payload + b'"]'
    if compressed:
        return _lib.masked(deflate(payload), rsv1=True)
    return _lib.masked(payload)


def pieces(frame: bytes, count: int) -> list[bytes]:
    """``count`` frames as what each ``transport.write`` gets: about CHUNK bytes each.

    Full chunks are the same bytes object, so the memory is one chunk whatever count is.
    """
    per = max(1, CHUNK // len(frame))
    full, rest = divmod(count, per)
    chunk = frame * per
    return [chunk] * full + ([frame * rest] if rest else [])


async def send_all(clients: Sequence[_lib.Client], data: list[bytes]) -> None:
    """Write ``data`` (in order) to every client, the clients taking turns, a client
    whose write buffer is over its high-water mark skipped until it drains."""
    wake = asyncio.Event()
    for c in clients:
        c.on_resume = wake.set
    total = len(data)
    progress = {c: 0 for c in clients if not c.closed and total}
    try:
        while progress:
            wrote = False
            for c, i in list(progress.items()):
                if c.closed:
                    del progress[c]
                elif not c.paused:
                    assert c.transport is not None
                    c.transport.write(data[i])
                    wrote = True
                    if i + 1 < total:
                        progress[c] = i + 1
                    else:
                        del progress[c]
            if wrote:
                await asyncio.sleep(0)  # let the loop flush what the sockets take
            elif progress:
                wake.clear()
                if all(c.paused for c in progress):
                    await wake.wait()
    finally:
        for c in clients:
            c.on_resume = None


@dataclass
class _Setup:
    kind: str
    cluster: _lib.Cluster
    clients: list[_lib.Client]
    frames: dict[int, bytes]


async def _sink_count(cluster: _lib.Cluster) -> tuple[int, float, float]:
    """The node's sink count, when it last moved, and its worst loop lag since the
    previous read."""
    stats = await asyncio.to_thread(cluster.stats)
    count, last, lag = stats["sink_messages"], stats["sink_last"], stats["sink_lag"]
    assert isinstance(count, int)
    assert isinstance(last, float | int) and isinstance(lag, float | int)
    return count, float(last), float(lag)


async def _burst(setup: _Setup, result: InboundResult, messages: int) -> None:
    clients = [c for c in setup.clients if not c.closed]
    frame = setup.frames[result.size]
    data = pieces(frame, messages)
    expected = messages * len(setup.clients)
    before, _, _ = await _sink_count(setup.cluster)
    cpu0 = setup.cluster.cpu()
    gen0 = time.process_time()
    start = time.perf_counter()
    await send_all(clients, data)
    count, last, worst = before, start, 0.0
    previous, since = count, time.perf_counter()
    while count - before < expected:
        await asyncio.sleep(POLL)
        count, last, lag = await _sink_count(setup.cluster)
        worst = max(worst, lag)
        now = time.perf_counter()
        if count != previous:
            previous, since = count, now
        elif now - since > STALL:
            break
    cpu = setup.cluster.cpu() - cpu0
    generator = time.process_time() - gen0
    received = count - before
    seconds = last - start if received and last > start else time.perf_counter() - start
    result.wire = len(frame)
    result.expected += expected
    result.received += received
    result.seconds += seconds
    result.cpu += cpu
    result.generator_cpu += generator
    result.rounds_us.append(cpu / received * 1e6 if received else float("inf"))
    result.rounds_rate.append(received / seconds)
    result.lag = max(result.lag, worst)
    result.closed = sum(1 for c in setup.clients if c.closed)
    await asyncio.sleep(0.3)


async def run(servers: Sequence[str], clients: int = 200, messages: int = 500,
              sizes: Sequence[int] = SIZES, rounds: int = 3) -> list[InboundResult]:
    """Start a node per server, then send bursts into each in turn, ``rounds`` times;
    results ordered by size, then server."""
    if any(_lib.speaks_socketio(s) and "+" in s for s in servers):
        raise ValueError("socketio+deflate is not supported (the client does not inflate "
                         "Engine.IO's compressed handshake)")
    results = {(s, size): InboundResult(s, size) for size in sizes for s in servers}
    setups: dict[str, _Setup] = {}
    with contextlib.ExitStack() as stack:
        for server in servers:
            kind, _, option = server.partition("+")
            compressed = option == "deflate"
            extra = ["--sink", *_lib.KEEPALIVE]
            if compressed and kind == "roomcast":
                extra.append("--compression")
            cluster = stack.enter_context(_lib.Cluster(kind, nodes=1, extra=extra))
            path = None if _lib.speaks_socketio(kind) else "/sink"
            conns = await _lib.connect(kind, cluster.ports[0], clients, "sink",
                                       deflate=compressed, path=path)
            stack.callback(_lib.close_all, conns)
            if compressed and not all(b"permessage-deflate" in c.response.lower()
                                      for c in conns):
                raise RuntimeError(f"{kind} did not accept permessage-deflate")
            frames = {size: client_frame(kind, size, compressed) for size in sizes}
            setups[server] = _Setup(kind, cluster, conns, frames)
        await asyncio.sleep(1.0)
        for r in range(rounds):
            order = list(servers[r % len(servers):]) + list(servers[:r % len(servers)])
            for size in sizes:
                for server in order:
                    await _burst(setups[server], results[(server, size)], messages)
    return [results[(s, size)] for size in sizes for s in servers]


def size_label(size: int) -> str:
    return f"{size // 1024} KB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def baseline(results: Sequence[InboundResult], r: InboundResult) -> InboundResult | None:
    """The roomcast result to compare ``r`` with: same size, same compression."""
    _, _, option = r.server.partition("+")
    name = "roomcast" + (f"+{option}" if option else "")
    return next((x for x in results if x.server == name and x.size == r.size), None)


def revision() -> str:
    """The commit measured, and whether the code under it had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_lib.ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "node", "shared",
                                "broker"], cwd=_lib.ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    return f"{head}{' with uncommitted changes in node/shared/broker' if dirty else ''}"


def table(results: Sequence[InboundResult], clients: int, messages: int,
          rounds: int) -> str:
    """The Markdown table of run.py and of this script."""
    lines = [
        f"\n### Inbound, {clients} clients sending {messages} messages each into one node whose "
        f"handler only counts, {rounds} rounds\n",
        "| server | size (wire B/frame) | received / expected | msgs/s (median) "
        "| CPU µs per message (median; rounds) | CPU vs roomcast | node CPU % "
        "| generator CPU % | worst loop lag ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = baseline(results, r)
        vs = ""
        if base is not None:
            finite = math.isfinite(r.us_per_message) and math.isfinite(base.us_per_message)
            vs = f"{r.us_per_message / base.us_per_message:.2f}x" if finite else "n/a"
        rounds_us = ", ".join(f"{u:.2f}" for u in r.rounds_us)
        closed = f" ({r.closed} clients closed)" if r.closed else ""
        lines.append(
            f"| {r.server} | {size_label(r.size)} ({r.wire:,}) | "
            f"{r.received:,} / {r.expected:,}{closed} | {r.rate:,.0f} | "
            f"**{r.us_per_message:.2f}** ({rounds_us}) | {vs} | {r.node_percent:.0f} | "
            f"{r.generator_percent:.0f} | {r.lag * 1e3:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    started = f"{time.strftime('%Y-%m-%d %H:%M')}, {revision()}"  # the code the nodes run
    results = asyncio.run(run(args.servers.split(","), args.clients, args.messages, sizes,
                              args.rounds))
    print(f"inbound: {started}, {_lib.machine()}")
    print(table(results, args.clients, args.messages, args.rounds))


if __name__ == "__main__":
    main()
