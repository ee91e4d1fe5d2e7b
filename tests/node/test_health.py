"""The broker state a node reports (roomcast.node.health), judged with plain values."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from roomcast.broker import BrokerStats
from roomcast.node.health import RECENT, BrokerHealth, BrokerState, Drain
from roomcast.node.hub import Hub


@dataclass
class FakeBroker:
    """Only what BrokerHealth reads: the connected flag and the publish counters."""

    connected: bool = True
    stats: BrokerStats = field(default_factory=BrokerStats)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def health_of(broker: FakeBroker) -> tuple[BrokerHealth, Hub, Clock]:
    hub = Hub(broker=broker)  # type: ignore[arg-type]
    clock = Clock()
    return BrokerHealth(hub, clock=clock, wall=clock), hub, clock


def test_connected_broker_is_connected_and_keeps_its_since() -> None:
    """Links up and no failure: connected, since the start, however long it holds."""
    health, _, clock = health_of(FakeBroker())
    clock.now += 60
    assert health.sample() is BrokerState.CONNECTED
    assert health.since == 1000.0 and health.changes == 0


def test_lost_link_with_no_traffic_is_disconnected_since_the_loss() -> None:
    """A link down and nothing crossing: disconnected, from the sample that saw it."""
    broker = FakeBroker()
    health, _, clock = health_of(broker)
    clock.now += 3
    broker.connected = False
    assert health.sample() is BrokerState.DISCONNECTED
    assert health.since == 1003.0 and health.changes == 1
    details = health.details()
    assert details["state"] == "disconnected" and details["connected"] is False


def test_lost_link_while_envelopes_still_cross_is_degraded() -> None:
    """Redis Cluster with one master down: the subscription is incomplete, but
    publishes to the other masters go out and envelopes come in: degraded, and
    disconnected once nothing has crossed for RECENT seconds."""
    broker = FakeBroker(connected=False)
    health, hub, clock = health_of(broker)
    clock.now += 1
    broker.stats.published += 1
    assert health.sample() is BrokerState.DEGRADED
    clock.now += RECENT / 2
    hub.stats.envelopes_received += 1
    assert health.sample() is BrokerState.DEGRADED
    clock.now += RECENT + 0.1
    assert health.sample() is BrokerState.DISCONNECTED


def test_failing_publishes_on_a_live_link_are_degraded_until_they_stop() -> None:
    """Links up but publishes failing (a frozen Redis): degraded; connected again once
    no publish has failed for RECENT seconds."""
    broker = FakeBroker()
    health, _, clock = health_of(broker)
    broker.stats.publish_failures += 1
    assert health.sample() is BrokerState.DEGRADED
    clock.now += RECENT + 0.1
    assert health.sample() is BrokerState.CONNECTED
    assert health.changes == 2


def test_drain_refuses_a_negative_notice() -> None:
    """A negative drain notice is a ValueError naming the value."""
    with pytest.raises(ValueError, match="-1"):
        Drain(-1)


def test_drain_begins_once() -> None:
    """begin() marks the drain with its start time once; later calls keep it."""
    clock = Clock()
    drain = Drain(2.0, clock=clock)
    assert not drain.draining and drain.since is None
    drain.begin()
    clock.now += 5
    drain.begin()
    assert drain.draining and drain.since == 1000.0
