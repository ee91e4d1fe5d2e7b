"""Three chat nodes with history on one redis-server (AOF, appendfsync always), haproxy in
front: what the client tests (tests/e2e/test_python_client.py, test_browser_clients.py)
reconnect and resume against. Every process is started on free ports and stopped by PID.

``disrupt`` does to a node what the client tests survive: ``kill`` (SIGKILL, the clients
see 1006), ``drain`` (SIGTERM, the clients get 1001) and ``redis`` (redis-server SIGKILLed
and restarted on its AOF, the nodes back on it, then the node SIGKILLed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

from tests.e2e.haproxy import HAProxy
from tests.e2e.procs import NodeProcess
from tests.redis_server import RedisServer

AOF_ALWAYS: Final = ("--appendonly", "yes", "--appendfsync", "always")
HISTORY: Final = ("--history-size", "500", "--history-ttl", "600")
Disruption = Literal["kill", "drain", "redis"]
DISRUPTIONS: Final[tuple[Disruption, ...]] = ("kill", "drain", "redis")


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


@dataclass
class ChatCluster:
    """The running processes, and the node id each node process reports."""

    redis: RedisServer
    nodes: list[NodeProcess]
    lb: HAProxy
    ids: dict[str, NodeProcess]
    """Node id (welcome's ``node``, /healthz ``node``) -> its process."""

    def node(self, node_id: str) -> NodeProcess:
        return self.ids[node_id]

    def other(self, *node_ids: str) -> NodeProcess:
        """A running node that is none of ``node_ids``."""
        for node_id, node in self.ids.items():
            if node_id not in node_ids and node.proc is not None and node.proc.poll() is None:
                return node
        raise AssertionError(f"no running node besides {node_ids}")

    def id_of(self, node: NodeProcess) -> str:
        return next(i for i, n in self.ids.items() if n is node)

    def logs(self) -> str:
        parts = [f"--- node {i} ---\n{n.log()[-3000:]}" for i, n in self.ids.items()]
        return "\n".join([*parts, f"--- haproxy ---\n{self.lb.log()[-2000:]}",
                          f"--- redis ---\n{self.redis.log_tail(30)}"])

    def brokers_connected(self) -> bool:
        """Every running node's broker is connected to Redis again (its /healthz)."""
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                continue
            try:
                if get_json(node.url + "/healthz")["broker"]["state"] != "connected":
                    return False
            except OSError:
                return False
        return True

    async def restart_redis(self, timeout: float = 30.0) -> None:
        """SIGKILL redis-server, start it again on its AOF, wait until every running
        node's broker is connected again."""
        await asyncio.to_thread(self.redis.kill)
        await asyncio.to_thread(self.redis.start)
        async with asyncio.timeout(timeout):
            while not await asyncio.to_thread(self.brokers_connected):  # noqa: ASYNC110
                await asyncio.sleep(0.1)  # polling /healthz: no event to await from here

    async def disrupt(self, how: Disruption, node_id: str) -> None:
        """Take the node ``node_id`` away as ``how`` says (see the module docstring)."""
        node = self.node(node_id)
        if how == "redis":
            await self.restart_redis()
        if how == "drain":
            code = await asyncio.to_thread(node.terminate, 30.0)
            assert code == 0, f"drained node exited with {code}\n{node.log()[-2000:]}"
        else:
            await asyncio.to_thread(node.kill)


@contextlib.contextmanager
def chat_cluster(count: int = 3, *extra: str) -> Iterator[ChatCluster]:
    """redis-server (AOF always), ``count`` nodes with history, haproxy with all UP."""
    redis = RedisServer(extra_args=AOF_ALWAYS)
    nodes: list[NodeProcess] = []
    try:
        redis.start()
        for _ in range(count):
            nodes.append(NodeProcess("--redis", redis.url, *HISTORY, *extra).start())
        with HAProxy([f"127.0.0.1:{n.port}" for n in nodes], check_inter="200ms") as lb:
            lb.wait_states({f"node{i + 1}": "UP" for i in range(count)})
            ids = {get_json(n.url + "/healthz")["node"]: n for n in nodes}
            assert len(ids) == count, ids
            yield ChatCluster(redis, nodes, lb, ids)
    finally:
        for node in nodes:
            node.kill()
        redis.cleanup()

