"""Event handlers: the callbacks the hub runs for a connection (the seed's ``EventHandler``)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from roomcast.node.messages import Message

if TYPE_CHECKING:
    from roomcast.node.connection import Connection

log = logging.getLogger("roomcast.node")

_Result: TypeAlias = Awaitable[None] | None
OnOpen: TypeAlias = Callable[["Connection"], _Result]
OnMessage: TypeAlias = Callable[["Connection", Message], _Result]
OnClose: TypeAlias = Callable[["Connection", int, str], _Result]
OnError: TypeAlias = Callable[["Connection", BaseException], _Result]
OnPing: TypeAlias = Callable[["Connection", bytes], _Result]


@dataclass(frozen=True, slots=True)
class EventHandler:
    """Callbacks for one kind of connection; each may be a coroutine or a plain function.

    An exception raised by a callback is logged and passed to ``on_error``; it never
    closes the connection or touches any other.
    """

    on_open: OnOpen | None = None
    on_message: OnMessage | None = None
    on_close: OnClose | None = None
    on_error: OnError | None = None
    on_ping: OnPing | None = None
    on_pong: OnPing | None = None


Callback: TypeAlias = Callable[..., Any]


async def run_callback(
    conn: Connection, handler: EventHandler, callback: Callback | None, *args: Any
) -> None:
    """Run one of ``handler``'s callbacks; what it raises goes to ``on_error`` and the log.

    A callback may be a coroutine function or a plain one; ``None`` is skipped.
    """
    if callback is None:
        return
    try:
        result = callback(conn, *args)
        if inspect.isawaitable(result):
            await result
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("callback %s failed on %s", getattr(callback, "__name__", callback),
                      conn.id, extra={"conn_id": conn.id})
        on_error = handler.on_error
        if on_error is not None and callback is not on_error:
            await run_callback(conn, handler, on_error, exc)
