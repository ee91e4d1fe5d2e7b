"""GET /metrics on one node: every counter moves with what it counts; the output parses."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
import websockets
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from roomcast.broker import MemoryBroker, MemoryBus
from roomcast.node import Connection, ConnectionState, EventHandler, Hub, HubConfig, Message
from roomcast.node.app import create_app
from roomcast.node.client import Client, Joined, Position
from roomcast.node.hub import HUB
from roomcast.node.metrics import LATENCY_BUCKETS, setup_metrics
from roomcast.shared.envelope import Kind, room_envelope
from roomcast.shared.errors import BrokerError
from roomcast.shared.history import History, HistoryPolicy
from roomcast.shared.ids import Room
from roomcast.shared.rfc6455 import CloseCode

Serve = Callable[[web.Application], Awaitable[str]]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

COUNTERS = [
    "roomcast_connections_opened",
    "roomcast_connections_refused",
    "roomcast_messages_received",
    "roomcast_received_bytes",
    "roomcast_messages_delivered",
    "roomcast_delivered_bytes",
    "roomcast_broadcasts",
    "roomcast_envelopes_published",
    "roomcast_envelopes_received",
    "roomcast_envelopes_dropped",
    "roomcast_broker_publish_failures",
    "roomcast_broker_reconnects",
    "roomcast_slow_consumer_disconnects",
    "roomcast_pong_timeouts",
    "roomcast_recoveries",
    "roomcast_messages_recovered",
    "roomcast_catchup_gaps",
    "roomcast_history_published",
    "roomcast_history_duplicates",
    "roomcast_history_reads",
    "roomcast_history_read_failures",
    "roomcast_rooms_resumed",
    "roomcast_joins_forbidden",
    "roomcast_tokens_expired",
    "roomcast_messages_rate_limited",
    "roomcast_rate_limit_disconnects",
]
GAUGES = ["roomcast_connections", "roomcast_rooms", "roomcast_broker_connected",
          "roomcast_history_size", "roomcast_history_ttl_seconds", "roomcast_recovery_max"]


def ws_url(base: str, path: str) -> str:
    return base.replace("http://", "ws://") + path


async def scrape(base: str) -> Samples:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    async with aiohttp.ClientSession() as session, session.get(base + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def until_metric(base: str, name: str, expected: float, timeout: float = 5.0,
                       **labels: str) -> Samples:
    """Scrape until ``name`` equals ``expected``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(base)
        if value(samples, name, **labels) == expected:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} is {value(samples, name, **labels)}, "
                                 f"not {expected}, after {timeout}s")
        await asyncio.sleep(0.02)


class Events:
    """A handler whose opened connections and received messages a test can await."""

    def __init__(self) -> None:
        self.opened: asyncio.Queue[Connection] = asyncio.Queue()
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.closed: asyncio.Queue[int] = asyncio.Queue()

    def handler(self) -> EventHandler:
        async def on_open(conn: Connection) -> None:
            await self.opened.put(conn)

        async def on_message(conn: Connection, msg: Message) -> None:
            await self.messages.put(msg)

        def on_close(conn: Connection, code: int, reason: str) -> None:
            self.closed.put_nowait(code)

        return EventHandler(on_open=on_open, on_message=on_message, on_close=on_close)


def metered_app(hub: Hub, events: Events, rooms: tuple[str, ...] = ("r",)) -> web.Application:
    app = web.Application()
    hub.attach(app)
    setup_metrics(app, hub)
    app.router.add_get("/ws", hub.route(events.handler(), rooms=rooms))
    return app


async def test_output_parses_with_every_family_and_type(serve: Serve) -> None:
    """A fresh node serves every roomcast family with the right type, all at zero."""
    base = await serve(create_app())
    async with aiohttp.ClientSession() as session, session.get(base + "/metrics") as resp:
        text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in COUNTERS:
        assert families[name].type == "counter", name
        assert all(s.value == 0 for s in families[name].samples
                   if s.name.endswith("_total")), name
    for name in GAUGES:
        assert families[name].type == "gauge", name
    latency = families["roomcast_delivery_latency_seconds"]
    assert latency.type == "histogram"
    bounds = [float(s.labels["le"]) for s in latency.samples if s.name.endswith("_bucket")]
    assert bounds == [*LATENCY_BUCKETS, float("inf")]
    reasons = {s.labels["reason"] for s in families["roomcast_connections_refused"].samples}
    for name in ("roomcast_recoveries", "roomcast_catchup_gaps"):
        outcomes = {s.labels["outcome"] for s in families[name].samples}
        assert outcomes == ({"recovered", "not_recovered"} if name == "roomcast_recoveries"
                            else {"filled", "lost"}), name
    assert reasons == {"full", "origin", "handshake", "draining", "auth", "forbidden", "rate",
                       "handshake_timeout", "user_limit"}


async def test_connections_messages_bytes_and_broadcasts(serve: Serve) -> None:
    """Opened connections, rooms, messages and bytes in and out, broadcasts are counted."""
    hub, events = Hub(), Events()
    base = await serve(metered_app(hub, events))
    async with websockets.connect(ws_url(base, "/ws")) as a, \
            websockets.connect(ws_url(base, "/ws")) as b:
        await events.opened.get()
        await events.opened.get()
        await a.send("hello")
        await b.send(b"\x00\x01\x02")
        await events.messages.get()
        await events.messages.get()
        await hub.broadcast_to_room("r", "hey")
        assert await a.recv() == "hey"
        assert await b.recv() == "hey"

        first = await scrape(base)
        assert value(first, "roomcast_connections") == 2
        assert value(first, "roomcast_rooms") == 1
        assert value(first, "roomcast_connections_opened_total") == 2
        assert value(first, "roomcast_messages_received_total") == 2
        assert value(first, "roomcast_received_bytes_total") == 5 + 3
        assert value(first, "roomcast_broadcasts_total") == 1
        assert value(first, "roomcast_messages_delivered_total") == 2
        assert value(first, "roomcast_delivered_bytes_total") == 2 * 3
        # A second scrape pushes no change twice.
        second = await scrape(base)
        assert {k: v for k, v in second.items() if k[0].startswith("roomcast_")} == {
            k: v for k, v in first.items() if k[0].startswith("roomcast_")
        }
    await events.closed.get()
    await events.closed.get()
    after = await scrape(base)
    assert value(after, "roomcast_connections") == 0
    assert value(after, "roomcast_rooms") == 0
    assert value(after, "roomcast_connections_opened_total") == 2


async def test_refusals_counted_by_reason(serve: Serve) -> None:
    """503 full, 403 origin, 400 handshake and 503 draining each count under their reason."""
    hub, events = Hub(HubConfig(max_connections=1)), Events()
    base = await serve(metered_app(hub, events))
    async with aiohttp.ClientSession() as session:
        kept = await session.ws_connect(ws_url(base, "/ws"))
        await events.opened.get()
        with pytest.raises(aiohttp.WSServerHandshakeError) as full:
            await session.ws_connect(ws_url(base, "/ws"))
        assert full.value.status == 503
        with pytest.raises(aiohttp.WSServerHandshakeError) as origin:
            await session.ws_connect(ws_url(base, "/ws"),
                                     headers={"Origin": "http://evil.example"})
        assert origin.value.status == 403
        async with session.get(base + "/ws") as plain:
            assert plain.status == 400
        await hub.close()
        await kept.close()
        with pytest.raises(aiohttp.WSServerHandshakeError) as draining:
            await session.ws_connect(ws_url(base, "/ws"))
        assert draining.value.status == 503
    samples = await scrape(base)
    for reason in ("full", "origin", "handshake", "draining"):
        assert value(samples, "roomcast_connections_refused_total", reason=reason) == 1, reason
    assert value(samples, "roomcast_connections_opened_total") == 1


async def test_slow_consumer_disconnect_is_counted(serve: Serve) -> None:
    """A member cut off for not reading shows in roomcast_slow_consumer_disconnects_total."""
    hub, events = Hub(HubConfig(send_buffer_limit=64 * 1024)), Events()
    base = await serve(metered_app(hub, events))
    async with aiohttp.ClientSession() as session:
        fast = await session.ws_connect(ws_url(base, "/ws"))
        await events.opened.get()
        host, port = base.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(sock, (host, int(port)))
            await loop.sock_sendall(
                sock,
                b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n",
            )
            slow = await asyncio.wait_for(events.opened.get(), 5)
            chunk = "y" * 16000
            for _ in range(2000):
                await hub.broadcast_to_room("r", chunk)
                assert (await fast.receive(timeout=5)).data == chunk
                if slow.state is not ConnectionState.OPEN:
                    break
            assert slow.close_code == CloseCode.TRY_AGAIN_LATER
        finally:
            sock.close()
            await fast.close()
    samples = await scrape(base)
    assert value(samples, "roomcast_slow_consumer_disconnects_total") == 1
    assert value(samples, "roomcast_pong_timeouts_total") == 0


async def test_pong_timeout_is_counted(serve: Serve) -> None:
    """A client that never answers the keepalive ping shows in roomcast_pong_timeouts_total."""
    hub, events = Hub(HubConfig(ping_interval_ms=50, pong_timeout_ms=100)), Events()
    base = await serve(metered_app(hub, events))
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(ws_url(base, "/ws"), autoping=False)
        assert (await ws.receive(timeout=5)).type is aiohttp.WSMsgType.PING
        closing = await ws.receive(timeout=5)
        assert closing.type is aiohttp.WSMsgType.CLOSE
        assert closing.data == CloseCode.INTERNAL_ERROR
        await ws.close()
    samples = await scrape(base)
    assert value(samples, "roomcast_pong_timeouts_total") == 1
    assert value(samples, "roomcast_slow_consumer_disconnects_total") == 0


async def test_latency_histogram_and_envelopes_across_two_hubs(serve: Serve) -> None:
    """An envelope from another node is observed once (not per recipient) and counted."""
    bus = MemoryBus()
    app_a = create_app(broker=MemoryBroker(bus))
    events = Events()
    hub_b = Hub(broker=MemoryBroker(bus))
    base_a = await serve(app_a)
    base_b = await serve(metered_app(hub_b, events))
    async with websockets.connect(ws_url(base_b, "/ws")) as m1, \
            websockets.connect(ws_url(base_b, "/ws")) as m2:
        await events.opened.get()
        await events.opened.get()
        await app_a[HUB].broadcast_to_room("r", "across")
        assert await m1.recv() == "across"
        assert await m2.recv() == "across"

        b = await scrape(base_b)
        assert value(b, "roomcast_delivery_latency_seconds_count") == 1
        assert value(b, "roomcast_delivery_latency_seconds_bucket", le="+Inf") == 1
        assert value(b, "roomcast_delivery_latency_seconds_bucket", le="1.0") == 1
        assert 0 <= value(b, "roomcast_delivery_latency_seconds_sum") < 1
        assert value(b, "roomcast_envelopes_received_total") == 1
        assert value(b, "roomcast_messages_delivered_total") == 2
        assert value(b, "roomcast_broadcasts_total") == 0

        a = await scrape(base_a)
        assert value(a, "roomcast_broadcasts_total") == 1
        assert value(a, "roomcast_envelopes_received_total") == 0
        assert value(a, "roomcast_delivery_latency_seconds_count") == 0

        # Garbage on the bus, as a rogue Redis client could publish, is dropped and counted.
        bus.send_raw(Kind.ALL, "", b"not an envelope")
        b = await until_metric(base_b, "roomcast_envelopes_dropped_total", 1)
        assert value(b, "roomcast_envelopes_received_total") == 1
        assert value(b, "roomcast_delivery_latency_seconds_count") == 1


async def test_history_settings_are_gauges(serve: Serve) -> None:
    """The configured history size, ttl and recovery_max are gauges; 0 without history."""
    configured = Hub(HubConfig(history=HistoryPolicy(History(50, 12.5)), recovery_max=7))
    base = await serve(metered_app(configured, Events()))
    samples = await scrape(base)
    assert value(samples, "roomcast_history_size") == 50
    assert value(samples, "roomcast_history_ttl_seconds") == 12.5
    assert value(samples, "roomcast_recovery_max") == 7

    base = await serve(metered_app(Hub(), Events()))
    samples = await scrape(base)
    assert value(samples, "roomcast_history_size") == 0
    assert value(samples, "roomcast_history_ttl_seconds") == 0
    assert value(samples, "roomcast_recovery_max") == 1000


async def test_recovery_and_catchup_counters_follow_hub_stats(serve: Serve) -> None:
    """Each recovery counter shows its HubStats field under its outcome, pushed once."""
    hub = Hub()
    base = await serve(metered_app(hub, Events()))
    hub.stats.recoveries, hub.stats.recoveries_failed = 3, 2
    hub.stats.messages_recovered = 41
    hub.stats.catchup_gaps_filled, hub.stats.catchup_gaps_lost = 5, 1
    for _ in range(2):  # a second scrape adds nothing
        samples = await scrape(base)
        assert value(samples, "roomcast_recoveries_total", outcome="recovered") == 3
        assert value(samples, "roomcast_recoveries_total", outcome="not_recovered") == 2
        assert value(samples, "roomcast_messages_recovered_total") == 41
        assert value(samples, "roomcast_catchup_gaps_total", outcome="filled") == 5
        assert value(samples, "roomcast_catchup_gaps_total", outcome="lost") == 1
    hub.stats.catchup_gaps_lost += 1
    samples = await scrape(base)
    assert value(samples, "roomcast_catchup_gaps_total", outcome="lost") == 2
    assert value(samples, "roomcast_catchup_gaps_total", outcome="filled") == 5


async def test_broker_history_counters(serve: Serve) -> None:
    """History publishes, an idempotent retry, reads and resumed rooms of the node's broker
    are counted from its BrokerStats."""
    history = History(10, 60)
    broker = MemoryBroker(MemoryBus())
    hub = Hub(HubConfig(history=HistoryPolicy(history)), broker=broker)
    base = await serve(metered_app(hub, Events()))
    room = Room("metered")
    await broker.subscribe(room)
    first = await broker.publish(room_envelope(room, b"a", binary=False), history=history,
                                 idempotency_key="key-1")
    again = await broker.publish(room_envelope(room, b"a", binary=False), history=history,
                                 idempotency_key="key-1")
    assert first is not None and again == first
    await broker.publish(room_envelope(room, b"b", binary=False), history=history)
    page = await broker.read_history(room, history, since=0)
    assert [e.payload for e in page.envelopes] == [b"a", b"b"]
    await broker.close()
    with pytest.raises(BrokerError):
        await broker.read_history(room, history)
    samples = await scrape(base)
    assert value(samples, "roomcast_history_published_total") == 2
    assert value(samples, "roomcast_history_duplicates_total") == 1
    assert value(samples, "roomcast_history_reads_total") == 1
    assert value(samples, "roomcast_history_read_failures_total") == 0
    assert value(samples, "roomcast_rooms_resumed_total") == 0
    # As RedisBroker counts a read Redis refused and rooms back after a lost link:
    broker.stats.history_read_failures += 2
    broker.stats.resumed_rooms += 3
    samples = await scrape(base)
    assert value(samples, "roomcast_history_read_failures_total") == 2
    assert value(samples, "roomcast_rooms_resumed_total") == 3


async def test_recoveries_and_catchup_counted_from_real_clients(serve: Serve) -> None:
    """A v1 client that recovers, one whose position is of a lost epoch, and a gap a node
    fills after its broker link came back show under their outcomes."""
    history = History(100, 60)
    bus = MemoryBus()
    other = Hub(HubConfig(history=HistoryPolicy(history)), broker=MemoryBroker(bus))
    broker = MemoryBroker(bus)
    hub = Hub(HubConfig(history=HistoryPolicy(history)), broker=broker)
    base = await serve(metered_app(hub, Events()))
    await serve(metered_app(other, Events(), rooms=()))
    url = ws_url(base, "/ws")
    fast = {"initial_delay": 0.01, "max_delay": 0.05}
    async with Client(url, **fast) as watcher:
        await watcher.wait_for(Joined, room="r")
        first = await hub.broadcast_to_room("r", "m1")
        assert first is not None
        for text in ("m2", "m3"):
            await hub.broadcast_to_room("r", text)
        for text in ("m1", "m2", "m3"):
            assert (await watcher.next_message()).data == text

        # behind by two: recovered, two messages replayed
        async with Client(url, positions={"r": (first.epoch, 1)}, **fast) as late:
            joined = await late.wait_for(Joined, room="r")
            assert (joined.recovered, joined.replayed) == (True, 2)
        # a position of an epoch the room never had: not recovered
        async with Client(url, positions={"r": ("gone", 1)}, **fast) as lost:
            joined = await lost.wait_for(Joined, room="r")
            assert (joined.recovered, joined.reason) == (False, "epoch")
        samples = await scrape(base)
        assert value(samples, "roomcast_recoveries_total", outcome="recovered") == 1
        assert value(samples, "roomcast_recoveries_total", outcome="not_recovered") == 1
        assert value(samples, "roomcast_messages_recovered_total") == 2

        # this node's link drops while another node publishes; when it comes back the
        # node reads the gap from the history and delivers it
        broker.lose_link()
        await other.broadcast_to_room("r", "while away")
        broker.restore_link()
        message = await watcher.next_message()
        assert (message.data, message.position) == ("while away", Position(first.epoch, 4))
        samples = await until_metric(base, "roomcast_catchup_gaps_total", 1, outcome="filled")
        assert value(samples, "roomcast_catchup_gaps_total", outcome="lost") == 0
        assert value(samples, "roomcast_rooms_resumed_total") == 1
        assert value(samples, "roomcast_history_published_total") == 3
        assert value(samples, "roomcast_history_reads_total") >= 3
    await other.close()
