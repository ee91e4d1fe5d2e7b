"""What the operations endpoints report: the broker's state as this node sees it, and the
drain that starts on SIGTERM.

Readiness (``/readyz``) means "this node can serve new clients": it is accepting and not
draining. It does not follow Redis: a node whose Redis link is down still serves its
local rooms, and a Redis outage (or one Redis Cluster master failing over) would
otherwise mark every node down at once, so that the load balancer refuses every new
user. The broker's state is reported instead, in ``/healthz`` details and in metrics.

Broker states, judged from the broker's ``connected`` flag and from the cross-node
traffic of the last ``RECENT`` seconds:

- ``connected``: its links are up and no cross-node publish failed recently.
- ``degraded``: part of the cross-node traffic flows and part does not: a link is down
  but envelopes still went out or came in recently (under Redis Cluster, one master is
  failing over and the rooms on the others keep flowing), or the links are up but a
  publish failed recently (e.g. a frozen Redis).
- ``disconnected``: a link is down and nothing crossed recently.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

from aiohttp import web

from roomcast.node.hub import Hub

RECENT: Final = 5.0
"""Seconds that a publish (failed or made) or a received envelope counts as recent."""
SAMPLE_INTERVAL: Final = 0.5
"""How often the broker state is sampled (it is also sampled on every report)."""


class BrokerState(StrEnum):
    """How much of the cross-node traffic flows, as this node sees it."""

    CONNECTED = "connected"
    DEGRADED = "degraded"
    DISCONNECTED = "disconnected"


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")


class BrokerHealth:
    """The broker state of one hub and since when it holds (monotonic and wall clock)."""

    def __init__(self, hub: Hub, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.hub = hub
        self._clock = clock
        self._wall = wall
        self._published = self._failures = self._received = 0
        self._last_flow: float | None = None
        self._last_failure: float | None = None
        self.state = BrokerState.CONNECTED if hub.broker.connected \
            else BrokerState.DISCONNECTED
        self.since = clock()
        self.since_wall = wall()
        self.changes = 0
        self._read_counters()

    def _read_counters(self) -> tuple[bool, bool]:
        """(envelopes went out or came in, a publish failed) since the last read."""
        stats = self.hub.broker.stats
        published = stats.published
        failures = stats.publish_failures
        received = self.hub.stats.envelopes_received
        flowed = published > self._published or received > self._received
        failed = failures > self._failures
        self._published, self._failures, self._received = published, failures, received
        return flowed, failed

    def sample(self) -> BrokerState:
        """Read the broker now; record a change of state. The current state."""
        now = self._clock()
        flowed, failed = self._read_counters()
        if flowed:
            self._last_flow = now
        if failed:
            self._last_failure = now
        recent_flow = self._last_flow is not None and now - self._last_flow <= RECENT
        recent_failure = self._last_failure is not None and now - self._last_failure <= RECENT
        if self.hub.broker.connected:
            state = BrokerState.DEGRADED if recent_failure else BrokerState.CONNECTED
        else:
            state = BrokerState.DEGRADED if recent_flow else BrokerState.DISCONNECTED
        if state is not self.state:
            self.state = state
            self.since = now
            self.since_wall = self._wall()
            self.changes += 1
        return state

    def details(self) -> dict[str, Any]:
        """The JSON-ready report: state, since when, for how long, and the raw flag."""
        state = self.sample()
        return {
            "state": state.value,
            "since": _iso(self.since_wall),
            "seconds": round(self._clock() - self.since, 3),
            "connected": self.hub.broker.connected,
            "type": type(self.hub.broker).__name__,
        }

    async def run(self) -> None:
        """Sample every SAMPLE_INTERVAL seconds until cancelled, so "since" is accurate
        to that even when nobody asks."""
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            self.sample()


class Drain:
    """The node's shutdown as a load balancer needs it: on SIGTERM (or SIGINT) fail
    readiness at once, keep serving for ``notice`` seconds so that the balancer marks
    the node down and sends nobody new here, then shut the app down as aiohttp does
    (stop listening; the hub closes every client with 1001). A second signal skips
    the rest of the notice."""

    def __init__(self, notice: float = 0.0, *, clock: Callable[[], float] = time.time) -> None:
        if notice < 0:
            raise ValueError(f"drain notice must be >= 0 seconds, got {notice}")
        self.notice = notice
        self._clock = clock
        self.since: float | None = None
        """Wall-clock time the drain began, None while not draining."""
        self._timer: asyncio.TimerHandle | None = None
        self._exiting = False

    @property
    def draining(self) -> bool:
        return self.since is not None

    def begin(self) -> None:
        """Fail readiness from now on (idempotent)."""
        if self.since is None:
            self.since = self._clock()

    def on_signal(self) -> None:
        """The signal handler: begin, then exit after the notice (at once if repeated).
        Once the exit is under way, more signals change nothing (the shutdown must not
        be cut short)."""
        if self._exiting:
            return
        if self.draining or self.notice <= 0:
            self.begin()
            self._exit()
        self.begin()
        self._timer = asyncio.get_running_loop().call_later(self.notice, self._exit)

    def _exit(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._exiting = True
        raise web.GracefulExit()

    def install(self, app: web.Application) -> None:
        """Handle SIGTERM and SIGINT this way once ``app`` starts (replacing
        ``web.run_app``'s handlers, which shut down at once)."""

        async def lifespan(_: web.Application) -> AsyncIterator[None]:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.on_signal)
            yield
            if self._timer is not None:
                self._timer.cancel()

        app.cleanup_ctx.append(lifespan)


def sampling(health: BrokerHealth) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that samples ``health`` in the background while the app runs."""

    async def lifespan(_: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(health.run(), name="roomcast-broker-health")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return lifespan
