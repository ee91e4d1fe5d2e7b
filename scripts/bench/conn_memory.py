"""Bytes of Python memory per idle connection, traced with tracemalloc, by source file.

A node process (this script with ``--serve``) traces every allocation; the driver opens
``--connections`` idle WebSocket connections (one room, no traffic) on plain blocking
sockets, and the node reports what was allocated meanwhile, per connection: in all and
in roomcast's own files, with the largest files. Complements onenode.py's RSS growth,
which moves with the allocator's arenas: this counts objects.

    python scripts/bench/conn_memory.py [--connections 3000]
    python scripts/bench/conn_memory.py --before /path/to/older/checkout

``--before`` measures an older checkout too (its ``node/``, ``broker/``, ``shared/``
folders imported as ``roomcast.*``) and prints both.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from pathlib import Path
from typing import Any

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def serve(port: int) -> None:
    """The node: /ws joins room "r"; /snap?name=... snapshots, /snap?name=after&n=N reports."""
    tracemalloc.start(1)
    from aiohttp import web

    from roomcast.node import EventHandler, Hub, HubConfig

    snapshots: dict[str, tracemalloc.Snapshot] = {}

    async def snap(request: web.Request) -> web.Response:
        gc.collect()
        name = request.query["name"]
        snapshots[name] = tracemalloc.take_snapshot()
        if name != "after":
            return web.json_response({})
        n = int(request.query["n"])
        diff = snapshots["after"].compare_to(snapshots["before"], "filename")
        own = [d for d in diff if "/roomcast/" in d.traceback[0].filename]
        return web.json_response({
            "total": sum(d.size_diff for d in diff) / n,
            "roomcast": sum(d.size_diff for d in own) / n,
            "files": [(Path(d.traceback[0].filename).name, round(d.size_diff / n))
                      for d in diff[:6]],
        })

    hub = Hub(HubConfig(max_connections=1_000_000))
    app = web.Application()
    hub.attach(app)
    app.router.add_get("/ws", hub.route(EventHandler(), rooms=("r",)))
    app.router.add_get("/snap", snap)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(UPGRADE)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("the node closed the connection during the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"upgrade refused: {head[:40]!r}")
    return sock


def measure(tree: Path | None, connections: int) -> dict[str, Any]:
    """Start a node (from ``tree``, or this checkout), open connections, get the report."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        if tree is not None:
            pkg = Path(tmp) / "roomcast"
            pkg.mkdir()
            for name in ("node", "broker", "shared"):
                (pkg / name).symlink_to(tree.resolve() / name)
            env["PYTHONPATH"] = tmp + os.pathsep + env.get("PYTHONPATH", "")
        node = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], env=env,
                                cwd=tmp, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        socks: list[socket.socket] = []
        try:
            base = f"http://127.0.0.1:{port}/snap?name="
            for _ in range(200):
                try:
                    urllib.request.urlopen(base + "warm", timeout=5).read()
                    break
                except OSError:
                    time.sleep(0.05)
            socks += [_connect(port) for _ in range(50)]  # first-connection allocations
            time.sleep(0.5)
            urllib.request.urlopen(base + "before", timeout=30).read()
            socks += [_connect(port) for _ in range(connections)]
            time.sleep(1.0)  # aiohttp lets the upgraded requests go just after the 101
            with urllib.request.urlopen(f"{base}after&n={connections}", timeout=60) as r:
                result: dict[str, Any] = json.load(r)
            return result
        finally:
            for sock in socks:
                sock.close()
            node.terminate()
            node.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--before", type=Path, help="an older checkout to compare with")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    trees: list[tuple[str, Path | None]] = [("this tree", None)]
    if args.before is not None:
        trees.insert(0, ("before", args.before))
    for name, tree in trees:
        r = measure(tree, args.connections)
        files = ", ".join(f"{f} {b}" for f, b in r["files"])
        print(f"{name:>10}: {r['total']:.0f} B per idle connection traced, "
              f"{r['roomcast']:.0f} B in roomcast's files ({files})")


if __name__ == "__main__":
    main()
