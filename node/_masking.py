"""Enforce RFC 6455's rule that client frames are masked, which aiohttp's reader skips.

``GuardedWebSocketResponse`` puts a ``MaskChecker`` in front of aiohttp's frame parser;
an unmasked frame fails the reader with a 1002 protocol error, as any other framing
error would. This leans on three aiohttp internals (the protocol's payload parser and
message tail, the response's reader); tests/node/test_raw_protocol.py pins it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import WebSocketError, WSCloseCode, web

from shared.errors import ProtocolError
from shared.frames import MaskChecker


class _MaskGuard:
    """Stands where aiohttp's WebSocketReader stood, checks masking, then hands on."""

    __slots__ = ("_checker", "_failed", "_inner", "_queue")

    def __init__(self, inner: Any, queue: Any) -> None:
        self._inner = inner
        self._queue = queue
        self._checker = MaskChecker()
        self._failed = False

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._failed:
            return False, b""
        try:
            self._checker.feed(data)
        except ProtocolError as exc:
            self._failed = True
            self._queue.set_exception(WebSocketError(WSCloseCode.PROTOCOL_ERROR, str(exc)))
            return False, b""
        result: tuple[bool, bytes] = self._inner.feed_data(data)
        return result


class GuardedWebSocketResponse(web.WebSocketResponse):
    """aiohttp's WebSocketResponse with the masking rule enforced."""

    def _post_start(self, request: web.BaseRequest, protocol: str | None, writer: Any) -> None:
        proto: Any = request.protocol
        tail: bytes = proto._message_tail
        proto._message_tail = b""
        super()._post_start(request, protocol, writer)
        guard = _MaskGuard(proto._payload_parser, self._reader)
        proto._payload_parser = guard
        if tail:
            guard.feed_data(tail)
