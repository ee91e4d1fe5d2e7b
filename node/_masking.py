"""Enforce the RFC 6455 rules that aiohttp's reader skips (masking, fragmentation
order, close codes, RSV1 on control frames, the length's top bit).

``GuardedWebSocketResponse`` puts a ``ClientFrameChecker`` in front of aiohttp's frame
parser; a violation fails the reader with the checker's close code, as any other
framing error would. This leans on three aiohttp internals (the protocol's payload
parser and message tail, the response's reader); tests/node/test_raw_protocol.py and
tests/e2e/test_hostile.py pin it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import WebSocketError, WSCloseCode, web

from shared.errors import ProtocolError
from shared.frames import ClientFrameChecker


class _MaskGuard:
    """Stands where aiohttp's WebSocketReader stood, checks masking, then hands on."""

    __slots__ = ("_checker", "_failed", "_inner", "_queue")

    def __init__(self, inner: Any, queue: Any) -> None:
        self._inner = inner
        self._queue = queue
        self._checker = ClientFrameChecker()
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
            self._queue.set_exception(WebSocketError(exc.close_code, str(exc)))
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

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        # aiohttp fails the connection on a reader error that is not a WebSocketError
        # (zlib.error: compressed data that does not inflate) with 1000, "purpose
        # fulfilled"; that is a protocol error (RFC 6455 section 7.4.1).
        if code == WSCloseCode.OK and self.exception() is not None:
            code = WSCloseCode.PROTOCOL_ERROR
        return await super().close(code=code, message=message, drain=drain)
