"""A flooding client against the others in its room: p99 latency with and without it.

One node (``roomcast serve``, the chat demo) with ``--max-messages-per-second``
``--burst`` and ``--max-connects-per-address``; ``--members`` clients in one room; a
speaker among them sends ``--rate`` stamped messages per second (within the limit),
and every member records publish-to-receipt latency. Each round measures ``--seconds``
without a flooder, then ``--seconds`` with one: a separate process that writes frames
to the same room as fast as the socket takes them and reconnects at once whenever it
is closed (1008), after ``Retry-After`` when refused (429). Members connect from
addresses of their own (127.0.1.x), the flooder from 127.0.0.1. The same is then done
against a node without limits, to show what the limits buy. Reports p50/p99 per phase,
the p99 ratio (the goal: under 1.2 with limits), what the flooder sent, and CPU.

    python scripts/bench/flood.py [--members 50] [--rate 20] [--seconds 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import _lib

LIMIT = 20
"""Messages per second a connection may send on the limited node (burst the same)."""


@dataclass
class Phase:
    name: str
    stamps: list[float] = field(default_factory=list)
    cpu: float = 0.0
    seconds: float = 0.0

    def q(self, quantile: float) -> float:
        return _lib.percentile(self.stamps, quantile) * 1000


def start_node(limited: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = _lib.free_port()
    args = [sys.executable, "-m", "roomcast.node.cli", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "WARNING", "--metrics", "false"]
    if limited:
        args += ["--max-messages-per-second", str(LIMIT), "--burst", str(LIMIT),
                 "--max-connects-per-address", "2"]
    proc = subprocess.Popen(args, cwd=_lib.ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _lib.wait_for_port(port, proc)
    return proc, port


# -- the flooder: a process of its own, so that its CPU is not the measuring loop's -------

def flood_worker(port: int, seconds: float, out: str) -> None:
    """Write frames into the room as fast as the socket takes them; reconnect when cut."""
    frame = _lib.masked(b"flood " + b"y" * 58)
    chunk = frame * 256
    request = (f"GET /chat?room=bench&name=flooder HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               "Upgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    sent = connects = refused = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(request)
                head = sock.recv(4096)
                if not head.startswith(b"HTTP/1.1 101"):
                    refused += 1
                    # As a client library would: wait for Retry-After (a connect flood
                    # is another attack, for the load balancer or firewall).
                    wait = 1.0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"retry-after:"):
                            wait = float(line.split(b":", 1)[1])
                    time.sleep(min(wait, max(0.0, end - time.monotonic())))
                    continue
                connects += 1
                sock.settimeout(0.5)
                while time.monotonic() < end:
                    sock.sendall(chunk)
                    sent += 256
        except OSError:
            continue
    with open(out, "w") as f:
        f.write(f"{sent} {connects} {refused} {time.process_time():.3f}\n")


def spawn_flooder(port: int, seconds: float, out: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, "--flood-worker", str(port),
                             str(seconds), out])


def read_flooder(out: str) -> tuple[float, ...]:
    """sent, connects, refused, CPU seconds: what the flooder wrote to ``out``."""
    with open(out) as f:
        numbers = tuple(float(x) for x in f.read().split())
    os.unlink(out)
    return numbers


# -- the members ------------------------------------------------------------------------

class Member(asyncio.Protocol):
    """Reads the room; stamped messages (``t <perf_counter µs> ...``) give latencies."""

    def __init__(self, sink: list[float] | None) -> None:
        self.buffer = bytearray()
        self.status = b""
        self.sink = sink
        self.open = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        if not self.open.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = bytes(buf[:12])
            del buf[:end + 4]
            self.open.set_result(None)
        now = time.perf_counter()
        while len(buf) >= 2:
            n = buf[1] & 0x7F
            offset = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, offset = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, offset = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < offset + n:
                return
            payload = bytes(buf[offset:offset + n])
            del buf[:offset + n]
            if self.sink is not None and payload.startswith(b"t "):
                sent = int(payload.split(b" ", 2)[1]) / 1e6
                self.sink.append(now - sent)


async def join(port: int, count: int, sink: list[float]) -> list[Member]:
    loop = asyncio.get_running_loop()
    members = []
    for i in range(count):
        _, member = await loop.create_connection(
            lambda: Member(sink), "127.0.0.1", port, local_addr=(f"127.0.1.{i + 1}", 0))
        assert member.transport is not None
        member.transport.write(
            (f"GET /chat?room=bench&name=m{i} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
             "Upgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        await asyncio.wait_for(member.open, 10)
        if member.status != b"HTTP/1.1 101":
            raise RuntimeError(f"member {i} was refused: {member.status!r}")
        members.append(member)
    return members


async def speak(speaker: Member, rate: int, seconds: float) -> None:
    assert speaker.transport is not None
    interval = 1 / rate
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        payload = b"t %d " % int(time.perf_counter() * 1e6) + b"x" * 40
        speaker.transport.write(_lib.masked(payload))
        await asyncio.sleep(max(0.0, start + (i + 1) * interval - time.perf_counter()))


async def measure(proc: subprocess.Popen[bytes], port: int, members: list[Member],
                  sink: list[float], phase: Phase, rate: int, seconds: float,
                  flood: bool) -> tuple[float, ...]:
    await asyncio.sleep(0.5)  # let earlier traffic drain
    sink.clear()
    flooder = None
    out = f"/tmp/roomcast-flood-{os.getpid()}.txt"
    if flood:
        flooder = spawn_flooder(port, seconds + 0.5, out)
        await asyncio.sleep(0.5)  # flooding from the first measured message on
    cpu = _lib.cpu_seconds(proc.pid)
    start = time.perf_counter()
    await speak(members[0], rate, seconds)
    await asyncio.sleep(0.3)  # the last messages' receipts
    phase.cpu += _lib.cpu_seconds(proc.pid) - cpu
    phase.seconds += time.perf_counter() - start
    phase.stamps += sink
    if flooder is None:
        return 0, 0, 0, 0.0
    await asyncio.to_thread(flooder.wait, 30)
    return read_flooder(out)


async def run(members: int, rate: int, seconds: float, rounds: int) -> None:
    print(f"flood: {members} members in one room, a speaker at {rate} msg/s, "
          f"{seconds:.0f} s per phase x {rounds} rounds; limit {LIMIT} msg/s, burst {LIMIT}, "
          "2 connects/s per address")
    print(f"machine: {_lib.machine()}")
    for limited in (True, False):
        proc, port = start_node(limited)
        sink: list[float] = []
        quiet, flooded = Phase("no flooder"), Phase("with flooder")
        totals = [0.0, 0.0, 0.0, 0.0]
        try:
            room = await join(port, members, sink)
            for _ in range(rounds):
                await measure(proc, port, room, sink, quiet, rate, seconds, False)
                got = await measure(proc, port, room, sink, flooded, rate, seconds, True)
                totals = [a + b for a, b in zip(totals, got, strict=True)]
            for member in room:
                if member.transport is not None:
                    member.transport.abort()
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
        label = "limited node" if limited else "node without limits"
        print(f"\n{label}:")
        expected = members * rate * seconds * rounds
        for phase in (quiet, flooded):
            print(f"  {phase.name:13} p50 {phase.q(0.5):7.2f} ms  p99 {phase.q(0.99):7.2f} ms"
                  f"  max {phase.q(1.0):8.2f} ms  received {len(phase.stamps)}/{expected:.0f}"
                  f"  node CPU {phase.cpu / phase.seconds * 100:5.1f}%")
        ratio = flooded.q(0.99) / quiet.q(0.99) if quiet.stamps else float("nan")
        print(f"  p99 with / without flooder: {ratio:.2f}"
              + ("  (goal: < 1.20)" if limited else ""))
        sent, connects, refused, cpu = totals
        print(f"  flooder: wrote {sent:.0f} messages over {connects:.0f} connections "
              f"({refused:.0f} upgrades refused), using {cpu:.1f} s of CPU itself")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (p99 on a shared machine "
          "moves with it: compare p50 and node CPU too)")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--flood-worker":
        flood_worker(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=50, help="at most 250")
    parser.add_argument("--rate", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(run(args.members, args.rate, args.seconds, args.rounds))


if __name__ == "__main__":
    main()
