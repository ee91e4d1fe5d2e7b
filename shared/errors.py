"""The roomcast exception tree.

RoomcastError
 ├── ProtocolError              malformed frame or handshake bytes (close code 1002)
 │    └── HandshakeError        an upgrade request that cannot be accepted (HTTP 400)
 ├── EnvelopeError              bytes from the broker that are not a valid envelope
 ├── ConnectionClosedError      sending on a connection that is closing or closed
 └── BrokerError                the broker could not do what was asked
      └── PublishError          a cross-node publish was not made; local delivery was

Errors that correspond to a WebSocket close code carry it as ``close_code``.
Argument validation raises the built-in ``ValueError`` and ``TypeError``.
"""

from __future__ import annotations

from roomcast.shared.rfc6455 import CloseCode


class RoomcastError(Exception):
    """Root of every error roomcast raises on purpose."""


class ProtocolError(RoomcastError):
    """Bytes that break RFC 6455; a peer that sent them is closed with ``close_code``."""

    close_code: CloseCode = CloseCode.PROTOCOL_ERROR

    def __init__(self, message: str, close_code: CloseCode = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.close_code = close_code


class HandshakeError(ProtocolError):
    """An HTTP request that is not a valid WebSocket upgrade; answer it with ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class EnvelopeError(RoomcastError):
    """Bytes read from the broker that do not decode to a valid envelope."""


class ConnectionClosedError(RoomcastError):
    """The connection is closing or closed; nothing more can be sent on it."""

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


class BrokerError(RoomcastError):
    """The broker failed; see the message for what to check (URL, Redis reachable)."""


class PublishError(BrokerError):
    """A cross-node publish could not be made.

    Local members were already served; members on other nodes did not get the message.
    ``maybe_sent`` is False when the command certainly never reached Redis (the broker
    was failing fast after an earlier failure), True when it may have (it timed out or
    the link broke after it was written): in a room with history such a message may
    still be stored and delivered later, so a retry should carry the same idempotency
    key.
    """

    def __init__(self, message: str, *, maybe_sent: bool = True) -> None:
        super().__init__(message)
        self.maybe_sent = maybe_sent
