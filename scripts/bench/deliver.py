"""Micro-benchmark of the hub's deliver loop: one frame to 10,000 in-memory members.

No sockets and no event loop turns: every member is an open connection on a fake
transport whose ``write`` only counts bytes, all in one room. One round is
``Hub._deliver`` (queue the broadcast's one frame for every member) followed by
``Hub._flush_all`` (one write per member), as a broadcast and the end of its loop turn
do. With ``--frames N``, N broadcasts are queued before the write pass, as concurrent
publishers' frames are (the frames after the first take the checked path). Prints
nanoseconds per member and frame (per delivery), the best of ``--repeat`` timings.

    python scripts/bench/deliver.py [--members 10000] [--frames 1] [--repeat 7] [--number 20]
    python scripts/bench/deliver.py --before /path/to/older/checkout [--rounds 3]

``--before`` measures an older checkout too (its ``node/``, ``broker/``, ``shared/``
folders imported as ``roomcast.*``), in fresh processes taking turns with this tree's,
and prints both and their ratio. The machine is shared and noisy: compare in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class FakeTransport:
    """What the write path calls on a transport; ``write`` only counts."""

    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False


def _members(hub: Any, room: str, count: int) -> None:
    """Open ``count`` connections on fake transports and put them in ``room``."""
    from roomcast.node import EventHandler
    from roomcast.node.connection import Connection
    from roomcast.shared.frames import MessageReader
    from roomcast.shared.ids import Room, make_connection_id

    try:
        import roomcast.node.core  # noqa: F401  (the sans-I/O core: after issue 11)
    except ImportError:
        core = False
    else:
        core = True
    for i in range(count):
        conn_id = make_connection_id(hub.node_id, i + 1)
        if core:
            reader = MessageReader(hub.config.max_message_size)
            conn = Connection(conn_id, hub, reader, hub._write_soon, "127.0.0.1")
            conn.attach(None, FakeTransport(), 0, 30.0)
        else:  # before issue 11: Connection held the buffer and the transport
            conn = Connection(conn_id, EventHandler(), hub, hub._schedule_flush)
            conn._attach(None, FakeTransport(), 0, 30.0)
        hub._connections[conn.id] = conn
        hub._rooms.join(Room(room), conn.id, conn)


async def _measure(members: int, frames: int, repeat: int, number: int) -> dict[str, float]:
    from roomcast.node import Hub
    from roomcast.shared.frames import PreparedMessage
    from roomcast.shared.ids import Room

    hub = Hub()
    _members(hub, "r", members)
    room = hub._rooms.members(Room("r"))
    prepared = PreparedMessage(b"x" * 64, binary=False)

    def one_round() -> None:
        for _ in range(frames):
            hub._deliver(room.values(), prepared, None)
        hub._flush_all()

    one_round()
    best = min(timeit.repeat(one_round, repeat=repeat, number=number))
    assert hub.stats.messages_out == members * frames * (1 + repeat * number)
    return {"ns_per_delivery": best / number / members / frames * 1e9}


def _run_tree(tree: Path | None, args: argparse.Namespace) -> float:
    """ns per delivery in a fresh process importing roomcast from ``tree`` (None: this)."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        if tree is not None:
            pkg = Path(tmp) / "roomcast"
            pkg.mkdir()
            for name in ("node", "broker", "shared"):
                (pkg / name).symlink_to(tree.resolve() / name)
            env["PYTHONPATH"] = tmp + os.pathsep + env.get("PYTHONPATH", "")
        out = subprocess.run(
            [sys.executable, __file__, "--members", str(args.members), "--frames",
             str(args.frames), "--repeat",
             str(args.repeat), "--number", str(args.number), "--json"],
            env=env, check=True, capture_output=True, text=True, cwd=tmp,
        ).stdout
    return float(json.loads(out)["ns_per_delivery"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--frames", type=int, default=1, help="broadcasts per write pass")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=20)
    parser.add_argument("--before", type=Path, help="an older checkout to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json:
        print(json.dumps(asyncio.run(
            _measure(args.members, args.frames, args.repeat, args.number))))
        return
    if args.before is None:
        ns = asyncio.run(_measure(args.members, args.frames, args.repeat, args.number))[
            "ns_per_delivery"]
        print(f"deliver + flush: {ns:.1f} ns per delivery ({args.members:,} members, "
              f"{args.frames} frame(s) per write)")
        return
    results: dict[str, list[float]] = {"before": [], "this tree": []}
    for _ in range(args.rounds):
        results["before"].append(_run_tree(args.before, args))
        results["this tree"].append(_run_tree(None, args))
    best = {name: min(values) for name, values in results.items()}
    for name, values in results.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"{name:>10}: {best[name]:.1f} ns per delivery (best of {runs})")
    print(f"this tree / before: {best['this tree'] / best['before']:.3f}")


if __name__ == "__main__":
    main()
