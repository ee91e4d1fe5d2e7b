"""Prometheus metrics at ``GET /metrics``: the hub's and the broker's counters.

The hot path never calls prometheus_client: the hub and the broker count in plain ints
(``HubStats``, the broker's ``BrokerStats``). ``NodeMetrics.sync`` pushes what changed
since the last sync into prometheus_client metrics; only the delivery latency histogram
is observed as it happens, once per envelope from another node.

Two modes, chosen by the environment when the process starts:

- **One process** (no ``PROMETHEUS_MULTIPROC_DIR``): every scrape syncs first, so it
  always shows current values. Process metrics (CPU, memory, fds) are included.
- **Several processes behind one port** (``roomcast serve --workers N``: the supervisor
  sets ``PROMETHEUS_MULTIPROC_DIR`` to a private directory). Each worker writes its
  values to memory-mapped files there, synced every ``SYNC_INTERVAL`` seconds and once
  more at shutdown; a scrape landing on any worker merges every worker's files, so it
  reports totals. Counters of exited workers stay in the totals; gauges are summed
  over live workers only (``livesum``), so another worker's gauge may lag a scrape by
  up to ``SYNC_INTERVAL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Final

from aiohttp import hdrs, web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from roomcast.broker import Broker, BrokerStats
from roomcast.node.health import BrokerHealth, BrokerState
from roomcast.node.hub import Hub, HubStats

log = logging.getLogger("roomcast.metrics")

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
"""Set (before the process starts) to a directory shared by the workers behind one port."""
SYNC_INTERVAL: Final = 1.0
"""Seconds between two pushes of the plain counters in multiprocess mode."""
LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
"""Publish-to-delivery seconds, from 0.5 ms (same host) to 5 s (a struggling Redis)."""
REFUSAL_REASONS: Final = ("full", "origin", "handshake", "draining", "auth", "forbidden",
                          "rate", "handshake_timeout")

_Reader = Callable[[HubStats, Broker], int]


def _broker(count: Callable[[BrokerStats], int]) -> _Reader:
    def read(_: HubStats, broker: Broker) -> int:
        return count(broker.stats)

    return read


def _stat(name: str) -> _Reader:
    def read(stats: HubStats, _: Broker) -> int:
        value: int = getattr(stats, name)
        return value

    return read


# Counter name (exposed with _total) -> (help, how to read its plain int).
_COUNTERS: Final[dict[str, tuple[str, _Reader]]] = {
    "roomcast_connections_opened": (
        "WebSocket connections accepted (upgraded).", _stat("connections_opened")),
    "roomcast_messages_received": (
        "Text and binary messages received from clients.", _stat("messages_in")),
    "roomcast_received_bytes": (
        "Payload bytes of the messages received from clients.", _stat("bytes_in")),
    "roomcast_messages_delivered": (
        "Messages queued to clients by broadcasts and sends: one per recipient.",
        _stat("messages_out")),
    "roomcast_delivered_bytes": (
        "Payload bytes queued to clients by broadcasts and sends: counted per recipient.",
        _stat("bytes_out")),
    "roomcast_broadcasts": (
        "Room broadcasts and broadcasts to everyone made on this node.", _stat("broadcasts")),
    "roomcast_envelopes_published": (
        "Envelopes published to other nodes.", _broker(lambda s: s.published)),
    "roomcast_envelopes_received": (
        "Envelopes received from other nodes and delivered locally.",
        _stat("envelopes_received")),
    "roomcast_envelopes_dropped": (
        "Envelopes from the broker dropped because they did not decode or validate.",
        _broker(lambda s: s.dropped)),
    "roomcast_broker_publish_failures": (
        "Cross-node publishes the broker could not make (the caller got PublishError).",
        _broker(lambda s: s.publish_failures)),
    "roomcast_broker_reconnects": (
        "Times the broker's subscription link was re-established.",
        _broker(lambda s: s.reconnects)),
    "roomcast_slow_consumer_disconnects": (
        "Connections cut off because they did not read fast enough (close 1008).",
        _stat("slow_consumers")),
    "roomcast_pong_timeouts": (
        "Connections closed because a keepalive pong did not come in time (close 1011).",
        _stat("pong_timeouts")),
    "roomcast_messages_recovered": (
        "Messages of a room's history sent to roomcast.v1 clients on join: what a "
        "recovering client missed, and recent history for a client that asked for it.",
        _stat("messages_recovered")),
    "roomcast_history_published": (
        "Messages this node stored in a room's history (and published with a position).",
        _broker(lambda s: s.history_published)),
    "roomcast_history_duplicates": (
        "Publishes whose idempotency key had been seen: answered with the first "
        "position, not stored or published again.",
        _broker(lambda s: s.duplicates)),
    "roomcast_history_reads": (
        "Reads of a room's history answered (joins with recovery or replay, node "
        "catch-up, room_history).",
        _broker(lambda s: s.history_reads)),
    "roomcast_history_read_failures": (
        "Reads of a room's history that failed (the broker was unreachable).",
        _broker(lambda s: s.history_read_failures)),
    "roomcast_rooms_resumed": (
        "Rooms whose subscription came back after a lost link, failover or slot move "
        "(each one's gap is then read from its history).",
        _broker(lambda s: s.resumed_rooms)),
    "roomcast_joins_forbidden": (
        "join_room calls refused by the room rules (RoomForbidden).", _stat("joins_forbidden")),
    "roomcast_tokens_expired": (
        "Connections closed because their token expired (close 4001).",
        _stat("tokens_expired")),
    "roomcast_messages_rate_limited": (
        "Client messages dropped for being over the connection's rate limit.",
        _stat("messages_rate_limited")),
    "roomcast_rate_limit_disconnects": (
        "Connections closed for flooding: over their rate limit again and again (close 1008).",
        _stat("rate_limit_closes")),
}

_REFUSED: Final[dict[str, Callable[[HubStats], int]]] = {
    "full": lambda s: s.refused_full,
    "origin": lambda s: s.refused_origin,
    "handshake": lambda s: s.refused_handshake,
    "draining": lambda s: s.refused_draining,
    "auth": lambda s: s.refused_auth,
    "forbidden": lambda s: s.refused_forbidden,
    "rate": lambda s: s.refused_rate,
    "user_limit": lambda s: s.refused_user_limit,
    "handshake_timeout": lambda s: s.handshake_timeouts,
}

# Counter name -> (help, label, label value -> how to read its plain int).
_LABELLED: Final[dict[str, tuple[str, str, dict[str, _Reader]]]] = {
    "roomcast_recoveries": (
        "Joins of a roomcast.v1 client that declared the last position it saw, by "
        "outcome: recovered (it got every message after it), not_recovered (told "
        "recovered: false: epoch, window, limit or unavailable).",
        "outcome",
        {"recovered": _stat("recoveries"), "not_recovered": _stat("recoveries_failed")}),
    "roomcast_catchup_gaps": (
        "Gaps in a room's stream on this node (after a lost broker link), by outcome: "
        "filled from the history, or lost (the room's members were sent lost).",
        "outcome",
        {"filled": _stat("catchup_gaps_filled"), "lost": _stat("catchup_gaps_lost")}),
}


class NodeMetrics:
    """The prometheus_client metrics of one hub, and the sync from its plain counters."""

    def __init__(self, hub: Hub, *, multiprocess_dir: str | None = None,
                 health: BrokerHealth | None = None) -> None:
        self.hub = hub
        self.health = health
        self.multiprocess = multiprocess_dir is not None
        # Metrics are not registered globally: several nodes may live in one process
        # (tests, embedders), each with its own registry.
        self._counters = {
            name: Counter(name, help_text, registry=None)
            for name, (help_text, _) in _COUNTERS.items()
        }
        self._refused = Counter(
            "roomcast_connections_refused",
            "Connection attempts refused before the upgrade, by reason.",
            ["reason"], registry=None,
        )
        self._labelled = {
            name: Counter(name, help_text, [label], registry=None)
            for name, (help_text, label, _) in _LABELLED.items()
        }
        self._connections = Gauge(
            "roomcast_connections", "Open WebSocket connections.",
            registry=None, multiprocess_mode="livesum",
        )
        self._rooms = Gauge(
            "roomcast_rooms",
            "Rooms with members on this node (summed over the node processes of this port).",
            registry=None, multiprocess_mode="livesum",
        )
        self._broker_connected = Gauge(
            "roomcast_broker_connected",
            "1 if the broker link is up (on every node process of this port), else 0.",
            registry=None, multiprocess_mode="livemin",
        )
        self._broker_state = Gauge(
            "roomcast_broker_state",
            "Node processes whose broker is in this state (connected, degraded, "
            "disconnected): 1 or 0 for one process.",
            ["state"], registry=None, multiprocess_mode="livesum",
        )
        self._broker_state_since = Gauge(
            "roomcast_broker_state_since_seconds",
            "Unix time the broker entered its current state (the latest over the node "
            "processes of this port).",
            registry=None, multiprocess_mode="livemax",
        )
        # Every node process of a port runs with the same settings: livemax shows them.
        self._history_size = Gauge(
            "roomcast_history_size",
            "Messages a room keeps in its history by default (--history-size; 0: no "
            "history).",
            registry=None, multiprocess_mode="livemax",
        )
        self._history_ttl = Gauge(
            "roomcast_history_ttl_seconds",
            "Seconds a room's messages are kept in its history by default "
            "(--history-ttl; 0 when there is no history).",
            registry=None, multiprocess_mode="livemax",
        )
        self._recovery_max = Gauge(
            "roomcast_recovery_max",
            "Most messages one recovering client is sent (--recovery-max).",
            registry=None, multiprocess_mode="livemax",
        )
        self.latency = Histogram(
            "roomcast_delivery_latency_seconds",
            "Seconds from publish on another node to local delivery, once per envelope.",
            buckets=LATENCY_BUCKETS, registry=None,
        )
        self._pushed: dict[str, int] = {}

        self.registry = CollectorRegistry(auto_describe=True)
        if multiprocess_dir is not None:
            MultiProcessCollector(  # type: ignore[no-untyped-call]
                self.registry, path=multiprocess_dir
            )
        else:
            for metric in (*self._counters.values(), self._refused,
                           *self._labelled.values(), self._connections,
                           self._rooms, self._broker_connected, self._broker_state,
                           self._broker_state_since, self._history_size,
                           self._history_ttl, self._recovery_max, self.latency):
                self.registry.register(metric)
            ProcessCollector(registry=self.registry)

    def observe_latency(self, seconds: float) -> None:
        """Record the delivery latency of one envelope from another node."""
        self.latency.observe(seconds)

    def sync(self) -> None:
        """Push what the plain counters gained since the last sync, and the gauges."""
        hub = self.hub
        stats, broker = hub.stats, hub.broker
        for name, (_, read) in _COUNTERS.items():
            self._push(self._counters[name], name, read(stats, broker))
        for reason, read_refused in _REFUSED.items():
            self._push(self._refused.labels(reason=reason), f"refused:{reason}",
                       read_refused(stats))
        for name, (_, label, readers) in _LABELLED.items():
            for label_value, read in readers.items():
                self._push(self._labelled[name].labels(**{label: label_value}),
                           f"{name}:{label_value}", read(stats, broker))
        self._connections.set(len(hub.connections()))
        self._rooms.set(len(hub.local_rooms()))
        self._broker_connected.set(1 if broker.connected else 0)
        if self.health is not None:
            current = self.health.sample()
            for state in BrokerState:
                self._broker_state.labels(state=state.value).set(
                    1 if state is current else 0)
            self._broker_state_since.set(self.health.since_wall)
        policy = hub.config.history
        default = policy.default if policy is not None else None
        self._history_size.set(default.size if default is not None else 0)
        self._history_ttl.set(default.ttl if default is not None else 0)
        self._recovery_max.set(hub.config.recovery_max)

    def _push(self, counter: Counter, key: str, value: int) -> None:
        delta = value - self._pushed.get(key, 0)
        if delta > 0:
            counter.inc(delta)
        self._pushed[key] = value

    async def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition for a scrape with this ``Accept`` header, and its content type."""
        self.sync()
        encode, content_type = choose_encoder(accept)
        # Merging many workers' files is file I/O: keep it off the event loop.
        body = await asyncio.to_thread(encode, self.registry)
        return body, content_type

    async def run(self) -> None:
        """Sync every SYNC_INTERVAL seconds until cancelled (multiprocess mode)."""
        while True:
            await asyncio.sleep(SYNC_INTERVAL)
            try:
                self.sync()
            except Exception:  # a metrics hiccup must never stop the node
                log.exception("syncing metrics failed")


def mark_worker_dead(pid: int, multiprocess_dir: str) -> None:
    """Stop counting an exited worker's gauges; its counters stay in the totals."""
    mark_process_dead(pid, multiprocess_dir)  # type: ignore[no-untyped-call]


METRICS: Final = web.AppKey("roomcast_metrics", NodeMetrics)
"""Where ``setup_metrics`` stores the node's metrics on the Application."""


def setup_metrics(app: web.Application, hub: Hub,
                  health: BrokerHealth | None = None) -> NodeMetrics:
    """Serve the hub's and broker's counters (and ``health``'s broker state, if given) at
    ``GET /metrics``.

    Uses multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` names a directory (it must
    be set before the process starts, as ``roomcast serve --workers N`` does).
    """
    multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
    metrics = NodeMetrics(hub, multiprocess_dir=multiprocess_dir, health=health)
    app[METRICS] = metrics
    previous = hub.on_envelope_latency
    if previous is None:
        hub.on_envelope_latency = metrics.observe_latency
    else:
        def observe_both(seconds: float) -> None:
            previous(seconds)
            metrics.observe_latency(seconds)

        hub.on_envelope_latency = observe_both

    async def metrics_handler(request: web.Request) -> web.Response:
        """Prometheus text (or OpenMetrics, if asked for) of this node or of all workers."""
        accept = ",".join(request.headers.getall(hdrs.ACCEPT, []))
        body, content_type = await metrics.render(accept)
        # Which node answered: behind one port, any worker may take a scrape.
        return web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type,
                                                "X-Roomcast-Node": hub.node_id})

    app.router.add_get("/metrics", metrics_handler)

    if metrics.multiprocess:
        tasks: list[asyncio.Task[None]] = []

        async def start_sync(_: web.Application) -> None:
            tasks.append(asyncio.create_task(metrics.run(), name="roomcast-metrics-sync"))

        async def final_sync(_: web.Application) -> None:
            # on_cleanup runs after the hub's cleanup context closed it, so the last
            # closes and messages are counted before the process exits.
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            metrics.sync()

        app.on_startup.append(start_sync)
        app.on_cleanup.append(final_sync)
    return metrics
