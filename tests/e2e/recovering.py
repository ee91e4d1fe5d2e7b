"""Recovering clients and a numbered publisher for end-to-end tests of room history.

``Member`` is a chat member on a ``roomcast.v1`` connection (``roomcast.node.client``:
it reconnects, declares its positions and drops duplicates) whose events are recorded
as they come. ``Burst`` publishes numbered messages (``<tag>:<n>``) to a room with
history straight into Redis (``Publisher``, the nodes' history policy), retrying each
under its own idempotency key until Redis takes it, so that each number is stored once.
``exactly_once`` compares what a member received with what was published.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from roomcast.broker.publisher import Publisher
from roomcast.node.client import (
    Client,
    Event,
    Joined,
    Lost,
    Message,
    Open,
    Position,
)
from roomcast.shared.errors import PublishError
from roomcast.shared.history import History, HistoryPolicy

HISTORY_SIZE = 2000
"""``--history-size`` of the nodes in these tests: larger than any burst, so that a
gap is never past the window (what is tested is the fault, not the trimming)."""
HISTORY_TTL = 300
NODE_HISTORY_ARGS = ("--history-size", str(HISTORY_SIZE), "--history-ttl", str(HISTORY_TTL))
POLICY = HistoryPolicy(History(size=HISTORY_SIZE, ttl=HISTORY_TTL))
"""The nodes' policy, for the Publisher (every publisher of a cluster must share it)."""


def recovering_client(url: str, positions: dict[str, tuple[str, int]] | None = None) -> Client:
    """A client that reconnects fast (the tests wait for the reconnects, bounded)."""
    return Client(url, positions=positions, initial_delay=0.05, max_delay=0.5,
                  going_away_delay=0.1, connect_timeout=15.0)


async def counter(base_url: str, name: str, **labels: str) -> float:
    """One sample of a node's /metrics (``name`` with exactly ``labels``; 0 if absent)."""
    async with aiohttp.ClientSession() as http, http.get(base_url + "/metrics") as resp:
        text = await resp.text()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", re.M)
    for found in pattern.finditer(text):
        if (found.group(1) or "") == want:
            return float(found.group(2))
    return 0.0


def parse(data: str | bytes, tag: str) -> int | None:
    """The number of a message ``<tag>:<n>``; None for anything else (chat notices)."""
    if isinstance(data, str) and data.startswith(tag + ":"):
        return int(data[len(tag) + 1:])
    return None


class Member:
    """A chat member (``/chat?room=...&name=...``) on a recovering v1 client.

    Every event is recorded in ``events``; ``wait`` awaits a condition on them, bounded.
    """

    def __init__(self, base_ws_url: str, room: str, name: str, *,
                 positions: dict[str, tuple[str, int]] | None = None) -> None:
        self.room = room
        self.name = name
        self.client = recovering_client(f"{base_ws_url}/chat?room={room}&name={name}",
                                        positions)
        self.events: list[Event] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Member:
        """Connect (first connection, bounded by ``connect_timeout``), then record."""
        await self.client.connect()
        self._task = asyncio.get_running_loop().create_task(self._record())
        await self.wait(lambda: any(isinstance(e, Joined) for e in self.events),
                        what=f"{self.name} joined")
        return self

    async def _record(self) -> None:
        async for event in self.client:
            self.events.append(event)
            self._changed.set()

    async def close(self) -> None:
        async with asyncio.timeout(10):
            await self.client.close()
            if self._task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task

    async def wait(self, condition: Callable[[], bool], *, timeout: float = 60.0,
                   what: str = "condition") -> None:
        """Until ``condition()`` holds, re-checked on every new event; TimeoutError
        (naming ``what`` and the last events) after ``timeout`` s."""
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"{what}: not after {timeout} s; last events of {self.name}: "
                               f"{self.events[-5:]}") from None

    # -- what was received

    def messages(self, room: str | None = None) -> list[Message]:
        room = self.room if room is None else room
        return [e for e in self.events if isinstance(e, Message) and e.room == room]

    def numbers(self, tag: str) -> list[int]:
        """The numbers of the ``tag`` messages received, in arrival order."""
        return [n for m in self.messages() if (n := parse(m.data, tag)) is not None]

    def positions_of(self, tag: str) -> dict[int, Position | None]:
        return {n: m.position for m in self.messages() if (n := parse(m.data, tag)) is not None}

    @property
    def joins(self) -> list[Joined]:
        return [e for e in self.events if isinstance(e, Joined)]

    @property
    def losses(self) -> list[Lost]:
        return [e for e in self.events if isinstance(e, Lost)]

    @property
    def opens(self) -> list[Open]:
        return [e for e in self.events if isinstance(e, Open)]

    def has(self, tag: str, number: int) -> bool:
        return number in self.numbers(tag)

    async def wait_for_number(self, tag: str, number: int, timeout: float = 60.0) -> None:
        await self.wait(lambda: self.has(tag, number), timeout=timeout,
                        what=f"{self.name} received {tag}:{number}")


@dataclass
class Burst:
    """Publishes ``<tag>:1`` ... ``<tag>:<count>`` to ``room`` through a Publisher.

    Each number is retried under its idempotency key until Redis takes it (bounded by
    ``deadline`` seconds per number), so that it is stored once however often Redis
    failed meanwhile; ``positions[n]`` is the position it got. ``reached(n)`` is set
    once number ``n`` was published: a test starts a fault there.
    """

    publisher: Publisher
    room: str
    count: int
    tag: str = "b"
    pause: float = 0.002
    """Seconds between two publishes: a burst spread over the fault, not a pacing sync."""
    deadline: float = 60.0
    positions: dict[int, Position] = field(default_factory=dict)
    failures: int = 0
    _marks: dict[int, asyncio.Event] = field(default_factory=dict)

    def reached(self, number: int) -> asyncio.Event:
        return self._marks.setdefault(number, asyncio.Event())

    async def run(self) -> None:
        for n in range(1, self.count + 1):
            until = time.monotonic() + self.deadline
            while True:
                try:
                    position = await self.publisher.publish_to_room(
                        self.room, f"{self.tag}:{n}", idempotency_key=f"{self.tag}-{n}")
                    break
                except PublishError:
                    self.failures += 1
                    if time.monotonic() > until:
                        raise
                    await asyncio.sleep(0.05)  # retry interval while Redis is away
            assert position is not None, "the room has no history: policy mismatch"
            self.positions[n] = Position(position.epoch, position.offset)
            if n in self._marks:
                self._marks[n].set()
            await asyncio.sleep(self.pause)


def exactly_once(member: Member, tag: str, count: int) -> None:
    """``member`` got ``<tag>:1..count`` each once, in order; the client dropped no
    duplicate (the server sent none) and no loss was reported."""
    got = member.numbers(tag)
    missing = sorted(set(range(1, count + 1)) - set(got))
    repeated = sorted({n for n in got if got.count(n) > 1})
    assert got == list(range(1, count + 1)), (
        f"{member.name}: {len(got)} of {count}, missing {missing[:20]}, repeated "
        f"{repeated[:20]}, out of order at "
        f"{next((i for i in range(1, len(got)) if got[i] < got[i - 1]), None)}")
    assert member.client.duplicates == 0, (
        f"{member.name}: the server sent {member.client.duplicates} duplicate(s)")
    assert not member.losses, f"{member.name}: {member.losses}"
    assert all(j.recovered is not False for j in member.joins), (
        f"{member.name}: {member.joins}")
