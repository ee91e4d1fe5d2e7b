"""Everything roomcast uses of aiohttp beyond its documented API, checked at import.

aiohttp parses and routes the upgrade request; after the hub has written the 101, the
socket is taken over (``take_over``) and aiohttp's request, parser, handler task and
``RequestHandler`` are let go, so that an idle connection costs only what the hub keeps.
aiohttp has no public way to hand a connection's transport to another protocol, so this
module leans on these parts of it:

- ``RequestHandler.set_parser(parser)``: how aiohttp's own ``web_ws.py`` receives the
  bytes that came after the upgrade request; here it hands them to the hub (and resumes
  reading if aiohttp had paused it for a full buffer).
- ``RequestHandler.transport`` (cleared, so aiohttp neither writes to nor closes the
  socket again) and ``RequestHandler.keep_alive(False)`` (cancels its keep-alive timer,
  which would keep the handler and its parser for 75 s more).
- ``RequestHandler._manager.connection_lost(handler)``: drops the handler from its
  server's connection registry, as if the client had gone.
- ``aiohttp._websocket.helpers.websocket_mask``: the compiled XOR that unmasks client
  frames (a 16 KB payload in 0.3 µs instead of 22 in pure Python; a 16 KB message is
  read 14 times faster); handed to
  ``shared.frames`` (which imports no aiohttp). Without aiohttp's C extensions it is
  not compiled: the node then says so in a warning and unmasks in pure Python.
- ``aiohttp.web_urldispatcher._default_expect_handler``: aiohttp's answer to
  ``Expect: 100-continue``, which the HTTP API calls once it has checked the request.
- ``Application._make_handler`` (wrapped on one app: every runner makes the app's
  ``Server`` through it), ``Server.connection_made(handler, transport)`` and
  ``Server.connection_lost`` (wrapped on that server: they hear of every accepted
  socket, and of it going or being taken over) and ``RequestHandler._request_count``
  (requests whose head was parsed): ``guard_handshakes`` closes sockets that have not
  sent a whole request head within the handshake timeout. aiohttp itself only has its
  keep-alive timeout (75 s) for them.

Nothing outside this module touches a private name or attribute of aiohttp. On import
it checks that each of the above exists with the shape used here and raises
``AiohttpMismatchError`` naming the installed aiohttp, the releases this was tested on
and what is missing, rather than failing on the first connection (or silently: losing
the bytes sent with the handshake, or reading large messages 14 times slower).
tests/node/test_aiohttp_seam.py, tests/node/test_raw_protocol.py and
tests/e2e/test_hostile.py pin the behaviour on whatever aiohttp is installed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, cast

import aiohttp
from aiohttp import web

from roomcast.shared.frames import Unmask, set_unmask

log = logging.getLogger("roomcast.node")

TESTED_AIOHTTP: Final = ("3.14.4", "3.14.5")
"""aiohttp releases the takeover was tested on (pyproject.toml has the lower bound)."""

TRANSPORT_METHODS: Final = (
    "write", "close", "abort", "is_closing", "get_write_buffer_size", "pause_reading",
    "resume_reading", "is_reading", "set_protocol",
)
"""What the node calls on a socket's transport. asyncio's and uvloop's transports, and
TLS over either, have them all; not all of them subclass ``asyncio.Transport``."""


class AiohttpMismatchError(ImportError):
    """The installed aiohttp lacks something the socket takeover needs."""


@dataclass(frozen=True, slots=True)
class _Internals:
    websocket_mask: Unmask
    expect_handler: Callable[[web.Request], Awaitable[Any]]


def _slots(cls: type) -> set[str]:
    return {name for klass in cls.__mro__ for name in getattr(klass, "__slots__", ())}


def _accepts(function: object, *args: object) -> bool:
    """True if ``function`` can be called with ``args`` (checked on its signature)."""
    if not callable(function):
        return False
    try:
        inspect.signature(function).bind(*args)
    except (TypeError, ValueError):
        return False
    return True


def _mask_works(mask: Callable[[bytes, bytearray], None]) -> bool:
    key, data = b"\x01\x02\x04\x08", bytearray(range(10))
    try:
        mask(key, data)
    except Exception:
        return False
    return data == bytearray(b ^ key[i % 4] for i, b in enumerate(range(10)))


def _find_internals() -> _Internals:
    """The parts of aiohttp this module uses; AiohttpMismatchError lists those missing."""
    missing: list[str] = []
    try:
        from aiohttp.base_protocol import BaseProtocol
        from aiohttp.web_protocol import RequestHandler
        from aiohttp.web_server import Server
    except ImportError as exc:
        missing.append(f"aiohttp.web_protocol / web_server / base_protocol ({exc})")
    else:
        if not _accepts(getattr(RequestHandler, "set_parser", None), None, object()):
            missing.append("RequestHandler.set_parser(parser)")
        if not _accepts(getattr(RequestHandler, "keep_alive", None), None, False):
            missing.append("RequestHandler.keep_alive(bool)")
        if "transport" not in _slots(BaseProtocol):
            missing.append("RequestHandler.transport (a slot of aiohttp's BaseProtocol)")
        if "_manager" not in _slots(RequestHandler):
            missing.append("RequestHandler._manager (a slot: the handler's Server)")
        if not _accepts(getattr(Server, "connection_lost", None), None, None, None):
            missing.append("Server.connection_lost(handler, exc)")
        if not _accepts(getattr(Server, "connection_made", None), None, None, None):
            missing.append("Server.connection_made(handler, transport)")
        if "_request_count" not in _slots(RequestHandler):
            missing.append("RequestHandler._request_count (a slot)")
        if "__slots__" in Server.__dict__:
            missing.append("Server without __slots__ (its connection_made is wrapped)")
    if not callable(getattr(web.Application, "_make_handler", None)):
        missing.append("Application._make_handler(**kwargs)")
    if not isinstance(getattr(web.BaseRequest, "protocol", None), property):
        missing.append("BaseRequest.protocol")
    mask: Unmask | None = None
    try:
        from aiohttp._websocket.helpers import websocket_mask
    except ImportError as exc:
        missing.append(f"aiohttp._websocket.helpers.websocket_mask ({exc})")
    else:
        if _mask_works(websocket_mask):
            mask = websocket_mask
        else:
            missing.append("websocket_mask(key, bytearray) unmasking in place")
    expect: Callable[[web.Request], Awaitable[Any]] | None = None
    try:
        from aiohttp.web_urldispatcher import _default_expect_handler
    except ImportError as exc:
        missing.append(f"aiohttp.web_urldispatcher._default_expect_handler ({exc})")
    else:
        if inspect.iscoroutinefunction(_default_expect_handler):
            expect = _default_expect_handler
        else:
            missing.append("_default_expect_handler as a coroutine function")
    if missing or mask is None or expect is None:
        raise AiohttpMismatchError(
            f"roomcast cannot take WebSocket connections over from aiohttp "
            f"{aiohttp.__version__}: missing {'; '.join(missing)}. It was tested on aiohttp "
            f"{', '.join(TESTED_AIOHTTP)}: install one of those "
            f"(pip install 'aiohttp=={TESTED_AIOHTTP[-1]}') or a roomcast release that "
            f"supports aiohttp {aiohttp.__version__}."
        )
    return _Internals(mask, expect)


_INTERNALS: Final = _find_internals()

COMPILED_MASK: Final = not isinstance(_INTERNALS.websocket_mask, types.FunctionType)
"""True if aiohttp's C extension unmasks client frames (False: aiohttp was installed
without its extensions, or AIOHTTP_NO_EXTENSIONS is set)."""

if COMPILED_MASK:
    set_unmask(_INTERNALS.websocket_mask)
else:
    log.warning(
        "aiohttp %s runs without its C extensions (AIOHTTP_NO_EXTENSIONS, or no wheel "
        "for this platform): client frames are unmasked in pure Python, which makes reading "
        "a 16 KB message about 14 times slower. Install aiohttp from a wheel, or unset "
        "AIOHTTP_NO_EXTENSIONS.", aiohttp.__version__,
    )

default_expect_handler: Final = _INTERNALS.expect_handler
"""aiohttp's handling of ``Expect: 100-continue`` (what a route does without its own)."""


class Upgraded(web.StreamResponse):
    """What ``Hub.upgrade`` returns to aiohttp: a 101 already written by the hub."""

    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__(status=101, headers=headers)
        self.force_close()

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


class _Tail:
    """Stands in for aiohttp's WebSocket reader in ``set_parser``: it receives the
    bytes aiohttp buffered after the upgrade request."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = bytearray()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.data += data
        return False, b""

    def feed_eof(self) -> None:
        return None


def guard_handshakes(app: web.Application, timeout: float, on_timeout: Callable[[], None]
                     ) -> None:
    """Close every socket of ``app`` that has not sent a complete request head within
    ``timeout`` seconds of being accepted; call ``on_timeout`` for each.

    Applies to the servers ``app`` is run on from now on (``web.run_app``, ``AppRunner``,
    aiohttp's ``TestServer``): each accepted socket gets one timer, which does nothing
    if a request (even a bad one, answered 400) was read by then or the socket is gone.
    Sockets kept alive after a request are left to aiohttp's keep-alive timeout.
    """
    make_handler = app._make_handler

    def make_guarded_handler(*args: Any, **kwargs: Any) -> Any:
        server = make_handler(*args, **kwargs)
        _guard_server(server, timeout, on_timeout)
        return server

    # Set on this one app (bypassing the Application.__setattr__ that aiohttp's debug
    # mode adds): other apps in the process keep aiohttp's own.
    object.__setattr__(app, "_make_handler", make_guarded_handler)


def _guard_server(server: Any, timeout: float, on_timeout: Callable[[], None]) -> None:
    connection_made = server.connection_made
    connection_lost = server.connection_lost
    timers: dict[Any, asyncio.TimerHandle] = {}
    """handler -> its timer, until it fires or the socket goes (or is taken over: the
    handler is let go then, and the timer with it)."""

    def check(handler: Any) -> None:
        timers.pop(handler, None)
        transport = handler.transport
        if transport is None or transport.is_closing() or handler._request_count:
            return
        on_timeout()
        transport.abort()

    def guarded_connection_made(handler: Any, transport: asyncio.Transport) -> None:
        connection_made(handler, transport)
        timers[handler] = asyncio.get_running_loop().call_later(timeout, check, handler)

    def guarded_connection_lost(handler: Any, exc: BaseException | None = None) -> None:
        timer = timers.pop(handler, None)
        if timer is not None:
            timer.cancel()
        connection_lost(handler, exc)

    server.connection_made = guarded_connection_made
    server.connection_lost = guarded_connection_lost


def take_over(request: web.Request, protocol: asyncio.BaseProtocol) -> tuple[asyncio.Transport,
                                                                             bytes]:
    """Point the request's socket at ``protocol``; return the transport and the bytes
    the client sent after the upgrade request, which ``protocol`` has yet to read.

    ConnectionResetError if the client went away during the handshake; TypeError if
    the server's transport lacks a method the node uses (``TRANSPORT_METHODS``).
    """
    handler = request.protocol
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("connection lost during the handshake")
    lacking = [name for name in TRANSPORT_METHODS if not callable(getattr(transport, name, None))]
    if lacking:
        raise TypeError(
            f"cannot serve a WebSocket on a {type(transport).__qualname__}: it has no "
            f"{', '.join(lacking)} (roomcast needs a stream transport such as asyncio's "
            f"or uvloop's)"
        )
    tail = _Tail()
    # Hands over what aiohttp buffered after the request, and resumes reading if
    # aiohttp paused the socket because that buffer filled up.
    handler.set_parser(cast(Any, tail))
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    handler.transport = None
    handler.keep_alive(False)
    manager = handler._manager
    if manager is not None:
        manager.connection_lost(handler, None)
    if not transport.is_reading():  # paused for any other reason: the hub reads now
        transport.resume_reading()
    data = bytes(tail.data)
    tail.data.clear()
    return transport, data
