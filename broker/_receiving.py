"""What both Redis brokers do with the bytes that arrive on their channels."""

from __future__ import annotations

import logging
import time
from typing import Final

from broker.base import Deliver
from shared.envelope import Kind, decode
from shared.errors import BrokerError, EnvelopeError
from shared.ids import NodeId, Room

log = logging.getLogger("roomcast.broker.redis")

_WARN_EVERY: Final = 1.0
"""Seconds between two warnings about the same kind of failure (publish, heartbeat)."""


class EnvelopeReceiver:
    """Decode, filter, count and deliver envelopes; rate-limited warnings.

    Subclasses set these attributes in ``__init__``.
    """

    _node: NodeId | None
    _deliver: Deliver | None
    _desired: set[Room]
    _closed: bool
    _last_warning: dict[str, float]
    dropped: int
    received: int

    def _on_message(self, data: bytes) -> None:
        try:
            envelope = decode(data)
        except EnvelopeError as exc:
            self.dropped += 1
            self._warn("dropped", "dropped an invalid envelope from Redis (%d so far): %s",
                       self.dropped, exc)
            return
        except Exception:
            # anyone can publish on our channels: a decoder bug must not kill the link
            self.dropped += 1
            log.exception("dropped an envelope the decoder choked on (%d so far)", self.dropped)
            return
        if envelope.origin and envelope.origin == self._node:
            return  # our own publish: the hub already delivered it locally
        if envelope.kind is Kind.ROOM and envelope.target not in self._desired:
            return  # in flight when the room's last local member left
        self.received += 1
        if self._deliver is None:
            return
        try:
            self._deliver(envelope)
        except Exception:
            log.exception("deliver callback raised for a %s envelope; listener goes on",
                          envelope.kind.name)

    def _require_running(self) -> NodeId:
        name = type(self).__name__
        if self._closed:
            raise BrokerError(f"this {name} is closed")
        if self._node is None:
            raise BrokerError(f"this {name} is not started; call start() first")
        return self._node

    def _warn(self, topic: str, message: str, *args: object) -> None:
        # an outage fails every call; one warning per second per topic is enough
        now = time.monotonic()
        if now - self._last_warning.get(topic, -_WARN_EVERY) >= _WARN_EVERY:
            self._last_warning[topic] = now
            log.warning(message, *args)
