"""How long clients take to come back after their node goes away, and what they replay.

Three nodes with history on one redis-server (AOF, appendfsync always) behind haproxy
(tests/e2e/chatcluster.py). ``--clients`` Python clients (roomcast.node.client, one
shared aiohttp session) join one room through haproxy; a sender on another node says
``--before`` lines, the node with the most clients is SIGKILLed (``--how kill``) or
drained with SIGTERM (``--how drain``), and the sender says ``--during`` more lines
at once while they reconnect. Printed: for the clients that were on that node, the
time from the kill (or SIGTERM) to their ``joined`` with ``recovered: true``
(p50/p95/max), the messages replayed, the duplicates dropped; and a check that every
client ended with every line exactly once, in order.

    .venv/bin/python scripts/bench/resume.py --clients 300 --how kill
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import _lib  # noqa: E402

from roomcast.node.client import Client, Joined, Message  # noqa: E402
from tests.e2e.chatcluster import ChatCluster, chat_cluster  # noqa: E402


@dataclass
class Bot:
    client: Client
    node: str
    texts: list[str] = field(default_factory=list)
    joins: list[tuple[float, Joined]] = field(default_factory=list)
    replayed: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        async for event in self.client:
            if isinstance(event, Message) and isinstance(event.data, str):
                obj = json.loads(event.data)
                if obj.get("type") == "message":
                    self.texts.append(obj["text"])
            elif isinstance(event, Joined):
                if self.joins:  # a reconnect's (the first join replays recent history)
                    self.replayed += event.replayed
                self.joins.append((time.monotonic(), event))
            self.changed.set()

    async def until(self, count: int, within: float) -> None:
        async with asyncio.timeout(within):
            while len(self.texts) < count:
                self.changed.clear()
                await self.changed.wait()


def url(base: str, room: str, name: str) -> str:
    return f"{base.replace('http', 'ws', 1)}/chat?room={room}&name={name}"


async def say(sender: Client, text: str) -> None:
    await sender.send(json.dumps({"type": "message", "name": "sender", "text": text}))


async def run(cluster: ChatCluster, args: argparse.Namespace) -> None:
    room = f"bench-{uuid.uuid4().hex[:8]}"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session, \
            contextlib.AsyncExitStack() as stack:
        bots: list[Bot] = []
        for i in range(args.clients):
            client = Client(url(cluster.lb.url, room, f"bot{i}"), session=session,
                            initial_delay=0.5, max_delay=5, heartbeat=None)
            await stack.enter_async_context(client)
            assert client.node is not None
            bots.append(Bot(client, client.node))
        readers = [asyncio.create_task(bot.read()) for bot in bots]
        per_node = Counter(bot.node for bot in bots)
        victim = per_node.most_common(1)[0][0]
        sender = await stack.enter_async_context(
            Client(url(cluster.other(victim).url, room, "sender"), session=session))
        total = args.before + args.during
        for i in range(args.before):
            await say(sender, f"line {i}")
        for bot in bots:
            await bot.until(args.before, 60)

        affected = [bot for bot in bots if bot.node == victim]
        started = time.monotonic()
        await cluster.disrupt(args.how, victim)
        for i in range(args.before, total):
            await say(sender, f"line {i}")
        for bot in bots:
            await bot.until(total, 120)
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    expected = [f"line {i}" for i in range(total)]
    wrong = sum(bot.texts != expected for bot in bots)
    back = []
    for bot in affected:
        times = [at for at, joined in bot.joins[1:] if joined.recovered]
        back.append(times[0] - started if times else float("inf"))
    back.sort()
    print(f"{args.clients} clients in one room over {len(per_node)} nodes ({dict(per_node)}); "
          f"{args.how} of the node with {len(affected)} of them")
    print(f"back with recovered=true after the {args.how}: "
          f"p50 {_lib.percentile(back, 0.5) * 1e3:.0f} ms, "
          f"p95 {_lib.percentile(back, 0.95) * 1e3:.0f} ms, max {back[-1] * 1e3:.0f} ms")
    print(f"messages replayed to them: {sum(bot.replayed for bot in affected)} "
          f"({args.during} lines said after the {args.how}, each to {len(affected)}, "
          f"plus join/leave notices); "
          f"duplicates dropped: {sum(bot.client.duplicates for bot in bots)}")
    print(f"clients with every line exactly once, in order: {len(bots) - wrong}/{len(bots)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=150)
    parser.add_argument("--before", type=int, default=20)
    parser.add_argument("--during", type=int, default=50)
    parser.add_argument("--how", choices=("kill", "drain"), default="kill")
    args = parser.parse_args()
    print(_lib.machine())
    with chat_cluster(3) as cluster:
        asyncio.run(run(cluster, args))


if __name__ == "__main__":
    main()
