"""Test helpers: an inbox that can be awaited, a bounded poll, and envelope builders."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from roomcast.broker.redis import RedisBroker
from roomcast.shared.envelope import Envelope, Kind
from roomcast.shared.ids import ConnectionId, NodeId

DEFAULT_TIMEOUT = 10.0


class Inbox:
    """A ``deliver`` callback that records envelopes and lets a test await them."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self._changed = asyncio.Event()

    def __call__(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)
        self._changed.set()

    @property
    def payloads(self) -> list[bytes]:
        """The payloads received so far, in order."""
        return [e.payload for e in self.envelopes]

    async def wait_for_payload(self, payload: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Return once ``payload`` was received; TimeoutError after ``timeout``."""
        await self.wait_until(lambda: payload in self.payloads, timeout)

    async def wait_until(self, check: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT) -> None:
        """Return once ``check()`` holds, re-checked at every delivery."""
        async with asyncio.timeout(timeout):
            while not check():
                self._changed.clear()
                await self._changed.wait()


@dataclass
class Node:
    """A started broker and the inbox it delivers to."""

    broker: RedisBroker
    inbox: Inbox

    @property
    def id(self) -> NodeId:
        """This node's id."""
        node = self.broker.node_id
        assert node is not None
        return node

    def conn(self, seq: int) -> ConnectionId:
        """The id of this node's ``seq``-th connection."""
        return ConnectionId(f"{self.id}.{seq:x}")


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = DEFAULT_TIMEOUT
) -> float:
    """Poll ``check`` until it holds; return the seconds it took, fail after ``timeout``."""
    start = time.monotonic()
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)  # polling interval, bounded by the deadline above


def envelope(
    kind: Kind, target: str, payload: bytes, *, origin: str = "", exclude: str = ""
) -> Envelope:
    """A text envelope (binary when the payload is not UTF-8)."""
    try:
        payload.decode()
        binary = False
    except UnicodeDecodeError:
        binary = True
    return Envelope(kind, target, payload, binary, origin=origin, exclude=exclude)


async def sync_with(sender: Node, receiver: Node, token: bytes) -> None:
    """Send ``receiver`` a marker from ``sender`` and wait for it.

    Redis hands messages to a subscriber in the order it processed the PUBLISHes, so once
    the marker is in, everything ``sender`` published before it has arrived too.
    """
    await sender.broker.publish(
        envelope(Kind.CONNECTION, receiver.conn(0xFFFF), token, origin=sender.id)
    )
    await receiver.inbox.wait_for_payload(token)
