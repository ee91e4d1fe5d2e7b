"""The peer on Node.js: socket.io 4 with @socket.io/redis-adapter and node-redis.

Runs ``socketio_js/server.js`` (the same room fan-out as socketio_node.py: ``?room=R``
joins R, a ``msg`` event is emitted to R on every node through Redis; WebSocket
transport only, no compression) with ``node``, in place of this process (exec: the
benchmark measures the pid it started). The npm packages of ``socketio_js/package.json``
(exact versions) are installed on first use into a cache directory,
``$BENCH_NPM_DIR`` or ``~/.cache/roomcast-bench/socketio-node``; nodes starting at once
take turns with a file lock. Needs ``node`` (18 or newer) and ``npm`` on PATH.

    python scripts/bench/socketio_js_node.py --port P --redis URL [--ping-interval S]
                                             [--sink] [--compression]
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "socketio_js"


def install_dir() -> Path:
    """Where the packages are installed (created and filled on first use)."""
    default = Path.home() / ".cache" / "roomcast-bench" / "socketio-node"
    target = Path(os.environ.get("BENCH_NPM_DIR") or default)
    target.mkdir(parents=True, exist_ok=True)
    manifest = (HERE / "package.json").read_bytes()
    with open(target / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        installed = target / "package.json"
        if not (installed.exists() and installed.read_bytes() == manifest
                and (target / "node_modules" / "socket.io").is_dir()):
            if shutil.which("npm") is None:
                sys.exit("socketio-node: npm is not on PATH (install Node.js 18+ with npm)")
            installed.write_bytes(manifest)
            subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--omit=dev",
                            "--no-package-lock"], cwd=target, check=True,
                           stdout=sys.stderr)
    return target


def main() -> None:
    target = install_dir()
    node = shutil.which("node")
    if node is None:
        sys.exit("socketio-node: node is not on PATH (install Node.js 18+)")
    env = {**os.environ, "NODE_PATH": str(target / "node_modules")}
    os.execve(node, [node, str(HERE / "server.js"), *sys.argv[1:]], env)


if __name__ == "__main__":
    main()
