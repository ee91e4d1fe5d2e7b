"""Micro-benchmark: node CPU per delivery of a room message from another node, history
off against on (the stream tracker's cost), for raw and for roomcast.v1 members.

No sockets: ``--members`` open connections on fake transports whose ``write`` only
counts bytes, all in one room; each round hands ``--messages`` envelopes from another
node to ``Hub._on_envelope`` (as the broker does after decoding) and runs the write pass.
With history off the envelopes carry no position; with it on each carries the next
offset and goes through the tracker. Prints ns per delivery (best of ``--repeat``) for
each mode and the ratio on/off. The machine is shared and noisy: compare within one run.

    python scripts/bench/node_history.py [--members 1000] [--messages 100] [--size 64]
                                          [--repeat 7]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from deliver import FakeTransport

from roomcast.broker import MemoryBroker
from roomcast.node import Hub, HubConfig
from roomcast.node.connection import Connection
from roomcast.shared.envelope import Envelope, Kind
from roomcast.shared.frames import MessageReader
from roomcast.shared.history import History, HistoryPolicy, Position
from roomcast.shared.ids import Room, make_connection_id, new_node_id


async def _hub(members: int, history: bool, v1: bool) -> Hub:
    config = HubConfig(history=HistoryPolicy(History(size=1000, ttl=60)) if history else None)
    hub = Hub(config, broker=MemoryBroker())
    await hub.start()
    room = Room("r")
    if history:
        stream = hub._catchup.open(room, History(size=1000, ttl=60))
        hub._catchup.start(stream, Position("bench", 0))
    for i in range(members):
        conn = Connection(make_connection_id(hub.node_id, i + 1), hub,
                          MessageReader(hub.config.max_message_size), hub._write_soon,
                          "127.0.0.1", "roomcast.v1" if v1 else None)
        conn.attach(None, FakeTransport(), 0, time.time() + 3600)  # type: ignore[arg-type]
        hub._connections[conn.id] = conn
        hub._rooms.join(room, conn.id, conn, framed=v1)
    return hub


async def _measure(members: int, messages: int, size: int, repeat: int, history: bool,
                   v1: bool) -> float:
    hub = await _hub(members, history, v1)
    other = new_node_id()
    payload = b"x" * size
    offset = 0

    def one_round() -> float:
        nonlocal offset
        envs = []
        for _ in range(messages):
            offset += 1
            envs.append(Envelope(Kind.ROOM, "r", payload, False, other, "", 0.0,
                                 "bench" if history else "", offset if history else 0))
        start = time.process_time()
        for env in envs:
            hub._on_envelope(env)
            hub._flush_all()
        return time.process_time() - start

    one_round()
    best = min(one_round() for _ in range(repeat))
    expected = members * messages * (1 + repeat)
    assert hub.stats.messages_out == expected, (hub.stats.messages_out, expected)
    hub._connections.clear()  # fake transports: nothing to close
    hub._framed_conns.clear()
    await hub.close()
    return best / (members * messages) * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    results: dict[tuple[bool, bool], Any] = {}
    for v1 in (False, True):
        for history in (False, True):
            results[(v1, history)] = asyncio.run(_measure(
                args.members, args.messages, args.size, args.repeat, history, v1))
    for v1 in (False, True):
        off, on = results[(v1, False)], results[(v1, True)]
        kind = "roomcast.v1" if v1 else "raw"
        print(f"{kind:>11} members: history off {off:.1f} ns, on {on:.1f} ns per delivery "
              f"(on/off {on / off:.3f}; {args.members:,} members, {args.size} B)")


if __name__ == "__main__":
    main()
