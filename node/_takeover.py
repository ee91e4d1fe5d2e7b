"""Take a socket over from aiohttp once the hub has accepted its upgrade request.

aiohttp has no public way to hand a connection's transport to another protocol, so
this leans on internals of its server protocol (``RequestHandler``): the bytes it
buffered after the upgrade request (``_message_tail``), its ``transport`` attribute
(cleared, so aiohttp neither writes to nor closes the socket again), its server's
connection registry (``_manager.connection_lost``) and ``keep_alive(False)``, which
cancels its keep-alive timer. The request handler that
called ``Hub.upgrade`` then returns ``Upgraded`` and aiohttp finishes the request as
if the client had gone: its request, parser and task are freed. tests/node/
test_raw_protocol.py and tests/e2e/test_hostile.py pin the behaviour; pyproject.toml
bounds the aiohttp versions it was tested with.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web


class Upgraded(web.StreamResponse):
    """What ``Hub.upgrade`` returns to aiohttp: a 101 already written by the hub."""

    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__(status=101, headers=headers)
        self.force_close()

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def take_over(request: web.Request, protocol: asyncio.BaseProtocol) -> tuple[asyncio.Transport,
                                                                             bytes]:
    """Point the request's socket at ``protocol``; return the transport and the bytes
    the client sent after the upgrade request, which ``protocol`` has yet to read.

    ConnectionResetError if the client went away during the handshake.
    """
    handler: Any = request.protocol
    transport = request.transport
    if transport is None or transport.is_closing() or not isinstance(
        transport, asyncio.Transport
    ):
        raise ConnectionResetError("connection lost during the handshake")
    tail: bytes = bytes(getattr(handler, "_message_tail", b"") or b"")
    handler._message_tail = b""
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    handler.transport = None
    # Its keep-alive timer (armed when the socket was accepted) would hold the handler
    # and its HTTP parser for keepalive_timeout (75 s) more.
    handler.keep_alive(False)
    manager = getattr(handler, "_manager", None)
    if manager is not None:
        manager.connection_lost(handler, None)
    if not transport.is_reading():
        transport.resume_reading()  # aiohttp pauses a socket whose buffer fills up
    return transport, tail
