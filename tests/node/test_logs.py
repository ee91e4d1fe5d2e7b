"""Structured logs: one line per event, each naming the node and the connection if any."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import websockets
from aiohttp import web

from roomcast.node import Connection, EventHandler, Hub, Message
from roomcast.node.logs import configure_logging, set_node_id

Serve = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Where configure_logging writes during the test; the handler is removed after."""
    out = io.StringIO()
    root = logging.getLogger()
    level = root.level
    yield out
    for handler in [h for h in root.handlers if h.get_name() == "roomcast"]:
        root.removeHandler(handler)
    root.setLevel(level)
    set_node_id(None)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_lines_carry_node_conn_and_exception(stream: io.StringIO) -> None:
    """Every JSON line parses and has ts, level, logger, msg, node, conn; exc when raised."""
    configure_logging("DEBUG", "json", "n1", stream=stream)
    log = logging.getLogger("roomcast.test")
    log.info("plain %s", "event")
    log.debug("about a connection", extra={"conn_id": "n1.2a"})
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        log.exception("it failed", extra={"conn_id": "n1.2b"})
    assert len(stream.getvalue().splitlines()) == 3  # the traceback stays on its line
    plain, about, failed = lines(stream)
    assert set(plain) == {"ts", "level", "logger", "msg", "node", "conn"}
    assert plain["ts"].endswith("Z")
    assert (plain["level"], plain["logger"], plain["msg"]) == ("INFO", "roomcast.test",
                                                               "plain event")
    assert (plain["node"], plain["conn"]) == ("n1", None)
    assert (about["level"], about["node"], about["conn"]) == ("DEBUG", "n1", "n1.2a")
    assert failed["conn"] == "n1.2b"
    assert "RuntimeError: boom" in failed["exc"] and "Traceback" in failed["exc"]


def test_text_lines_name_node_and_conn_on_one_line(stream: io.StringIO) -> None:
    """Text lines carry node= and conn=; a newline in a message cannot start a new line."""
    configure_logging("INFO", "text", None, stream=stream)
    log = logging.getLogger("roomcast.test")
    log.info("before the hub")
    set_node_id("n7")
    log.info("forged\n2020-01-01 INFO fake line", extra={"conn_id": "n7.1"})
    log.debug("below the level")
    first, second = stream.getvalue().splitlines()
    assert " INFO roomcast.test node=- before the hub" in first
    assert " node=n7 conn=n7.1 forged\\n2020-01-01 INFO fake line" in second


def test_configure_again_replaces_its_own_handler_and_rejects_bad_values(
    stream: io.StringIO,
) -> None:
    """A second configure_logging does not double every line; bad level/format raise."""
    configure_logging("INFO", "text", "n1", stream=io.StringIO())
    configure_logging("INFO", "json", "n2", stream=stream)
    logging.getLogger("roomcast.test").warning("once")
    assert [(e["msg"], e["node"]) for e in lines(stream)] == [("once", "n2")]
    with pytest.raises(ValueError, match="log format"):
        configure_logging("INFO", "xml", None, stream=stream)
    with pytest.raises(ValueError, match="level"):
        configure_logging("LOUD", "json", None, stream=stream)


async def test_hub_records_carry_the_connection_id(serve: Serve, stream: io.StringIO) -> None:
    """What the hub logs about a connection (open, failed callback) names node and conn."""
    hub = Hub()
    configure_logging("DEBUG", "json", hub.node_id, stream=stream)

    def on_message(conn: Connection, msg: Message) -> None:
        raise ValueError("handler bug")

    app = web.Application()
    hub.attach(app)
    app.router.add_get("/ws", hub.route(EventHandler(on_message=on_message)))
    base = await serve(app)
    async with websockets.connect(base.replace("http://", "ws://") + "/ws") as ws:
        assert ws.response is not None
        conn_id = ws.response.headers["X-Roomcast-Connection"]
        await ws.send("trigger")
        pong = await ws.ping()  # answered only after the message before it was handled
        await asyncio.wait_for(pong, 5)
    entries = [e for e in lines(stream) if e["logger"] == "roomcast.node"]
    assert all(e["node"] == hub.node_id for e in entries)
    about_conn = [e for e in entries if e["conn"] == conn_id]
    assert any(e["msg"].startswith("opened") for e in about_conn)
    failed = [e for e in about_conn if "exc" in e]
    assert failed and "ValueError: handler bug" in failed[0]["exc"]


def test_probe_requests_are_not_access_logged() -> None:
    """Health checks and scrapes stay out of the access log; other requests do not."""
    import io
    import logging

    from roomcast.node.logs import configure_logging

    stream = io.StringIO()
    handler = configure_logging("INFO", "text", "n1", stream=stream)
    try:
        access = logging.getLogger("aiohttp.access")
        access.info('127.0.0.1 "GET /readyz HTTP/1.1" 200 6')
        access.info('127.0.0.1 "GET /metrics HTTP/1.1" 200 600')
        access.info('127.0.0.1 "GET /chat?room=r HTTP/1.1" 101 0')
        # What `roomcast serve` logs with: RedactingAccessLogger (no protocol after the path).
        from aiohttp import web
        from aiohttp.test_utils import make_mocked_request

        from roomcast.node.auth import RedactingAccessLogger

        redacting = RedactingAccessLogger(access, "")
        for path in ("/healthz", "/readyz", "/metrics?x=1", "/healthzz", "/chat?token=t"):
            redacting.log(make_mocked_request("GET", path), web.Response(), 0.001)
    finally:
        logging.getLogger().removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert [line.split('"')[1] for line in lines] == [
        "GET /chat?room=r HTTP/1.1", "GET /healthzz", "GET /chat?token=[redacted]"]


async def test_an_attached_hub_logs_started_and_stopped_once(stream: io.StringIO) -> None:
    """The app's shutdown and then its cleanup both close the hub; it says so once."""
    configure_logging("INFO", "json", None, stream=stream)
    app = web.Application()
    hub = Hub()
    hub.attach(app, drain_seconds=1.0)
    runner = web.AppRunner(app)
    await runner.setup()
    await asyncio.wait_for(runner.cleanup(), 10)
    said = [line["msg"] for line in lines(stream) if line["logger"] == "roomcast.node"]
    assert said == [f"node {hub.node_id} started", f"node {hub.node_id} stopped"]
