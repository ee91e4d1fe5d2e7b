"""A private Redis Cluster for tests: redis-server processes on free loopback ports.

``LocalRedisCluster(masters=3, replicas=1)`` starts ``masters * (1 + replicas)``
redis-server processes with ``cluster-enabled yes`` and a short node timeout (fast
failover), joins them with ``redis-cli --cluster create ... --cluster-yes`` and waits
until every node reports ``cluster_state:ok`` and agrees on who serves every slot. It
only ever signals the processes it started (by PID, through ``RedisServer``), always
stops them, and removes their directories, also when start-up fails half way.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from types import TracebackType
from typing import Any

import redis
from redis.crc import key_slot

from tests.redis_server import RedisServer, free_port

_START_ATTEMPTS = 3


class LocalRedisCluster:
    """A Redis Cluster of child processes, started and stopped by the test."""

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 0,
        *,
        node_timeout_ms: int = 1000,
        startup_timeout: float = 30.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        self.masters = masters
        self.replicas = replicas
        self._node_timeout_ms = node_timeout_ms
        self._startup_timeout = startup_timeout
        self._extra_args = extra_args
        self.servers: list[RedisServer] = []

    # -- addresses ------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        """The client ports of every process this cluster started, in start order."""
        return [s.port for s in self.servers]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...`` naming every node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def server(self, port: int) -> RedisServer:
        """The process serving ``port``."""
        for server in self.servers:
            if server.port == port:
                return server
        raise KeyError(f"no node of this cluster listens on {port}")

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> LocalRedisCluster:
        """Start the processes, create the cluster, wait until it is fully up."""
        if self.servers:
            raise RuntimeError("this LocalRedisCluster is already started")
        try:
            for _ in range(self.masters * (1 + self.replicas)):
                self.servers.append(self._start_node())
            self._create()
            self.wait_until_ok()
        except BaseException:
            self.cleanup()
            raise
        return self

    def cleanup(self) -> None:
        """Stop every process this cluster started and delete its directory; idempotent."""
        servers, self.servers = self.servers, []
        for server in servers:
            with contextlib.suppress(Exception):
                server.kill()  # no state worth a clean shutdown
        for server in servers:
            server.cleanup()

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- topology -------------------------------------------------------------------

    def client(self, port: int) -> redis.Redis:
        """A synchronous plain client of the node on ``port`` (with its password, if set)."""
        return self.server(port).client()

    def running_ports(self) -> list[int]:
        """Ports of the processes that are alive now."""
        return [s.port for s in self.servers if s.running]

    def slot_owners(self, port: int | None = None) -> dict[int, int]:
        """Slot -> port of the master serving it, as node ``port`` (or a live one) sees it."""
        with self.client(port or self.running_ports()[0]) as client:
            ranges = client.execute_command("CLUSTER", "SLOTS")
        owners: dict[int, int] = {}
        for start, end, master, *_ in ranges:
            for slot in range(int(start), int(end) + 1):
                owners[slot] = int(master[1])
        return owners

    def master_of(self, key: str | bytes) -> int:
        """The port of the master that serves ``key``'s slot."""
        return self.slot_owners()[key_slot(key.encode() if isinstance(key, str) else key)]

    def master_ports(self) -> list[int]:
        """Ports of the masters that own slots now."""
        return sorted(set(self.slot_owners().values()))

    def wait_until_ok(self, timeout: float | None = None) -> None:
        """Wait until every live node says cluster_state:ok and all agree on slot owners."""
        deadline = time.monotonic() + (timeout or self._startup_timeout)
        last = "not checked yet"
        while True:
            try:
                last = self._check_ok()
                if not last:
                    return
            except (redis.RedisError, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"Redis Cluster not ok in time: {last}")
            time.sleep(0.05)  # poll interval, bounded by the deadline above

    def wait_for_new_master(self, slot: int, old_port: int, timeout: float = 30.0) -> int:
        """After ``old_port`` died: wait until a live master serves ``slot``; its port."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(redis.RedisError, OSError):
                owner = self.slot_owners().get(slot)
                if owner is not None and owner != old_port and self.server(owner).running:
                    return owner
            if time.monotonic() > deadline:
                raise TimeoutError(f"no replica took over slot {slot} from {old_port}")
            time.sleep(0.05)  # poll interval, bounded by the deadline above

    def migrate_slot(self, slot: int, to_port: int) -> int:
        """Move ``slot`` (and its keys) to the master on ``to_port``; the old owner's port.

        The documented resharding steps: IMPORTING on the target, MIGRATING on the
        source, MIGRATE every key, then SETSLOT NODE on both and on every other master.
        """
        from_port = self.slot_owners()[slot]
        if from_port == to_port:
            raise ValueError(f"slot {slot} is already served by {to_port}")
        with self.client(to_port) as target, self.client(from_port) as source:
            to_id = _text(target.execute_command("CLUSTER", "MYID"))
            from_id = _text(source.execute_command("CLUSTER", "MYID"))
            target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", from_id)
            source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", to_id)
            while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                source.execute_command(
                    "MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys
                )
            target.execute_command("CLUSTER", "SETSLOT", slot, "NODE", to_id)
            source.execute_command("CLUSTER", "SETSLOT", slot, "NODE", to_id)
        for port in self.master_ports():
            if port not in (from_port, to_port):
                with self.client(port) as other:
                    other.execute_command("CLUSTER", "SETSLOT", slot, "NODE", to_id)
        return from_port

    # -- private --------------------------------------------------------------------

    def _start_node(self) -> RedisServer:
        for attempt in range(_START_ATTEMPTS):
            # the bus port is given explicitly: the default, port + 10000, may be taken
            port, bus = free_port(), free_port()
            server = RedisServer(
                port,
                startup_timeout=self._startup_timeout,
                extra_args=(
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(self._node_timeout_ms),
                    "--cluster-port", str(bus),
                    *self._extra_args,
                ),
            )
            try:
                return server.start()
            except RuntimeError:
                server.cleanup()
                if attempt == _START_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _create(self) -> None:
        args = ["redis-cli", "--cluster", "create",
                *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-yes"]
        if self.replicas:
            args += ["--cluster-replicas", str(self.replicas)]
        try:
            subprocess.run(args, check=True, capture_output=True, timeout=self._startup_timeout,
                           stdin=subprocess.DEVNULL)
        except subprocess.CalledProcessError as exc:
            output = (exc.stdout + exc.stderr).decode(errors="replace")
            raise RuntimeError(f"redis-cli --cluster create failed:\n{output}") from None

    def _check_ok(self) -> str:
        """What is not ready yet, or '' when every live node is ok and all agree."""
        views: list[dict[int, int]] = []
        for port in self.running_ports():
            with self.client(port) as client:
                info = client.execute_command("CLUSTER", "INFO")
                state = _text(info)
                if "cluster_state:ok" not in state:
                    return f"node {port} is not ok"
                views.append(self.slot_owners(port))
                replication = client.info("replication")
                if replication.get("role") == "slave" and (
                    replication.get("master_link_status") != "up"
                ):
                    return f"replica {port} has not synced with its master"
        if any(len(v) != 16384 for v in views):
            return "some slots are not served"
        if any(v != views[0] for v in views):
            return "nodes disagree on slot owners"
        masters = len(set(views[0].values()))
        if masters != self.masters:
            return f"{masters} masters serve slots, expected {self.masters}"
        return ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
