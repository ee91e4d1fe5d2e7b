"""node/recovery.py: the stream tracker and a joining member with plain values, and the
catch-up driver on the event loop with a fake history read."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from roomcast.node.recovery import (
    LOST,
    MESSAGE,
    Catchup,
    Lost,
    PendingJoin,
    RoomStream,
    Step,
    StreamTracker,
)
from roomcast.node.stats import HubStats
from roomcast.shared.envelope import Envelope, Kind
from roomcast.shared.errors import BrokerError
from roomcast.shared.frames import PreparedMessage
from roomcast.shared.history import History, HistoryPage, Position
from roomcast.shared.ids import Room

ROOM = Room("r")
H = History(size=100, ttl=60)


def env(offset: int, epoch: str = "e1") -> Envelope:
    return Envelope(Kind.ROOM, ROOM, f"m{offset}".encode(), False, epoch=epoch, offset=offset)


def page(top: int, offsets: list[int], epoch: str = "e1", since: int = 0,
         more: bool = False) -> HistoryPage:
    return HistoryPage(ROOM, epoch, top, tuple(env(o, epoch) for o in offsets), since, more)


def offsets(steps: list[Step] | None) -> list[object]:
    assert steps is not None
    return [s.offset if isinstance(s, Envelope) else (s.position, s.reason) for s in steps]


START = Position("e1", 0)


def started(position: Position | None = START) -> tuple[StreamTracker, RoomStream]:
    tracker = StreamTracker(hold_max=10)
    stream = tracker.open(ROOM, H)
    assert tracker.start(stream, position) == []
    return tracker, stream


def test_in_order_duplicates_and_untracked_rooms() -> None:
    """The next offset is delivered, a passed one dropped, another room's is None."""
    tracker, _ = started()
    assert offsets(tracker.offer(env(1))) == [1]
    assert offsets(tracker.offer(env(2))) == [2]
    assert offsets(tracker.offer(env(2))) == []
    assert offsets(tracker.offer(env(1))) == []
    other = Envelope(Kind.ROOM, "other", b"x", False, epoch="e1", offset=1)
    assert tracker.offer(other) is None


def test_gap_is_held_then_drained_in_order() -> None:
    """Later offsets wait for the missing one, then all go in order."""
    tracker, stream = started()
    assert offsets(tracker.offer(env(3))) == []
    assert offsets(tracker.offer(env(2))) == []
    assert stream.held
    assert offsets(tracker.offer(env(1))) == [1, 2, 3]
    assert offsets(tracker.offer(env(4))) == [4]


def test_epoch_change_waits_for_a_read_then_is_lost_at_the_new_epochs_start() -> None:
    """Another epoch arrives live: it waits for a history read, which delivers what the
    old epoch still had, then Lost(new epoch, just before its first message, 'epoch')
    and the new epoch's messages in order (those read and those that came live); late
    envelopes of the left epoch are dropped."""
    tracker, stream = started(Position("e1", 5))
    tracker.offer(env(7))  # held: 6 is missing
    assert offsets(tracker.offer(env(4, "e2"))) == []  # waits for the read
    assert [e.offset for e in stream.ahead] == [4]
    read = HistoryPage(ROOM, "e2", 4, (env(6), env(7), env(3, "e2"), env(4, "e2")), 5)
    steps, _ = tracker.fill(stream, read, 5)
    assert offsets(steps) == [6, 7, (Position("e2", 2), "epoch"), 3, 4]
    assert stream.ahead == [] and stream.position == Position("e2", 4)
    assert offsets(tracker.offer(env(8, "e1"))) == []
    assert offsets(tracker.offer(env(5, "e2"))) == [5]


def test_epoch_change_with_nothing_of_the_new_epoch_read_is_lost_at_its_top() -> None:
    """A history that was lost whole (a restart without persistence): Lost at the new
    epoch's top, then what follows it live."""
    tracker, stream = started(Position("e1", 5))
    tracker.offer(env(1, "e2"))
    steps, _ = tracker.fill(stream, page(0, [], epoch="e2", since=5), 5)
    assert offsets(steps) == [(Position("e2", 0), "epoch"), 1]
    assert stream.position == Position("e2", 1)


def test_give_up_on_a_new_epoch_goes_on_in_it() -> None:
    """The history cannot be read after an epoch change: Lost before the first envelope
    of the new epoch, then those that came."""
    tracker, stream = started(Position("e1", 5))
    tracker.offer(env(9, "e2"))
    tracker.offer(env(10, "e2"))
    assert offsets(tracker.give_up(stream, "unavailable")) == [
        (Position("e2", 8), "epoch"), 9, 10]


def test_envelopes_before_start_wait_for_the_first_position() -> None:
    """Before the first read gave a position, envelopes wait; start delivers them all,
    also those published before the read counted them (they came after the subscription,
    so the members here have not had them: 60 members joining at once lost their own
    join notices); a failed first read (None) takes the first envelope as the
    position."""
    tracker = StreamTracker()
    stream = tracker.open(ROOM, H)
    assert offsets(tracker.offer(env(4))) == []
    assert offsets(tracker.offer(env(5))) == []
    assert offsets(tracker.start(stream, Position("e1", 4))) == [4, 5]
    assert offsets(tracker.offer(env(5))) == []
    later = StreamTracker()
    lstream = later.open(ROOM, H)
    later.offer(env(7))
    assert offsets(later.start(lstream, Position("e1", 5))) == []  # 6 missing: held
    assert [*lstream.held] == [7]
    blind = StreamTracker()
    bstream = blind.open(ROOM, H)
    assert blind.start(bstream, None) == []
    assert offsets(blind.offer(env(9))) == [9]
    assert offsets(blind.offer(env(10))) == [10]


def test_fill_delivers_the_gap_and_says_it_filled_it() -> None:
    """A read holding the missing offsets delivers them, then the held ones."""
    tracker, stream = started(Position("e1", 2))
    tracker.offer(env(5))
    steps, filled = tracker.fill(stream, page(5, [3, 4, 5], since=2), 2)
    assert offsets(steps) == [3, 4, 5] and filled
    steps, filled = tracker.fill(stream, page(5, [], since=5), 5)
    assert steps == [] and not filled


def test_fill_past_the_window_reports_lost_then_goes_on() -> None:
    """A read that starts later than needed: Lost(window) at the first it has."""
    tracker, stream = started(Position("e1", 2))
    tracker.offer(env(7))
    steps, filled = tracker.fill(stream, page(7, [5, 6, 7], since=2), 2)
    assert offsets(steps) == [(Position("e1", 4), "window"), 5, 6, 7]
    assert not filled


def test_fill_past_the_limit_and_with_another_epoch() -> None:
    """A page that is cut by the read limit: Lost(limit); a page of another epoch: Lost
    (epoch) before its first message, then its messages."""
    tracker, stream = started(Position("e1", 0))
    steps, _ = tracker.fill(stream, page(9, [8, 9], since=0, more=True), 0)
    assert offsets(steps) == [(Position("e1", 7), "limit"), 8, 9]
    steps, _ = tracker.fill(stream, page(3, [1, 2, 3], epoch="e2", since=9), 9)
    assert offsets(steps) == [(Position("e2", 0), "epoch"), 1, 2, 3]
    assert offsets(tracker.offer(env(4, "e2"))) == [4]


def test_give_up_skips_to_the_first_held() -> None:
    """When the history cannot be read, the held envelopes go after a Lost."""
    tracker, stream = started(Position("e1", 1))
    tracker.offer(env(4))
    tracker.offer(env(5))
    assert offsets(tracker.give_up(stream, "unavailable")) == [
        (Position("e1", 3), "unavailable"), 4, 5]


def frame(name: str) -> PreparedMessage:
    return PreparedMessage(name.encode(), binary=False)


def test_pending_join_queues_then_passes_only_what_follows_its_position() -> None:
    """While reading everything waits; after joined only later offsets of its epoch go,
    messages without a position always go, excluded ones advance without a frame."""
    join = PendingJoin(ROOM)
    f3, f4, f5, free = frame("3"), frame("4"), frame("5"), frame("free")
    assert join.offer((MESSAGE, "e1", 3, f3)) is None
    assert join.offer((MESSAGE, None, 0, free)) is None
    assert join.offer((MESSAGE, "e1", 4, f4)) is None
    assert join.joined(Position("e1", 3)) == [free, f4]
    assert join.offer((MESSAGE, "e1", 4, f4)) is None
    assert join.offer((MESSAGE, "e1", 5, None)) is None  # excluded, but passed
    assert (join.epoch, join.offset) == ("e1", 5)
    lost_old = frame("lost-old")
    assert join.offer((LOST, "e1", 5, lost_old)) is None
    lost_new = frame("lost-new")
    assert join.offer((LOST, "e2", 0, lost_new)) is lost_new
    assert join.offer((MESSAGE, "e1", 9, f5)) is None
    assert join.offer((MESSAGE, "e2", 1, f5)) is f5


def test_pending_join_catches_up_with_the_stream() -> None:
    """A joining member is caught up once at the stream's position (or the room is gone)."""
    tracker, stream = started(Position("e1", 4))
    join = PendingJoin(ROOM)
    assert not join.caught_up(stream)
    join.joined(Position("e1", 6))
    assert not join.caught_up(stream)
    tracker.offer(env(5))
    tracker.offer(env(6))
    assert join.caught_up(stream)
    assert join.caught_up(None)
    assert Lost(Position("e1", 1), "window").reason == "window"


# -- Catchup on the event loop, with a fake history read --------------------------------


class FakeHistory:
    """Answers reads from a list of envelopes; can fail or hold reads."""

    def __init__(self) -> None:
        self.top = 0
        self.envelopes: list[Envelope] = []
        self.fail = False
        self.reads: list[int] = []
        self.gate: asyncio.Event | None = None
        self.changed = asyncio.Event()
        """Set at every read and every emit (what wait_until waits on)."""

    def emit(self, into: list[Step]) -> Callable[[Room, list[Step]], None]:
        def emit(room: Room, steps: list[Step]) -> None:
            into.extend(steps)
            self.changed.set()
        return emit

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def read(self, room: Room, history: History, since: int, limit: int) -> HistoryPage:
        self.reads.append(since)
        self.changed.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise BrokerError("redis is down (test)")
        after = [e for e in self.envelopes if e.offset > since]
        return HistoryPage(room, "e1", self.top, tuple(after[-limit:]), since,
                           len(after) > limit)


def catchup(fake: FakeHistory, emitted: list[Step], stats: HubStats, *, hold_max: int = 10
            ) -> tuple[Catchup, RoomStream]:
    c = Catchup(fake.read, fake.emit(emitted), stats, limit=100, grace=0.01,
                hold_max=hold_max)
    stream = c.open(ROOM, H)
    c.start(stream, Position("e1", 0))
    return c, stream


async def test_catchup_reads_a_gap_after_the_grace() -> None:
    """A held gap is read from the history and delivered in order; counted as filled."""
    fake, stats = FakeHistory(), HubStats()
    emitted: list[Step] = []
    c, _ = catchup(fake, emitted, stats)
    fake.envelopes = [env(1), env(2), env(3)]
    fake.top = 3
    assert c.offer(env(3))
    await fake.wait_until(lambda: len(emitted) == 3)
    assert offsets(emitted) == [1, 2, 3]
    assert fake.reads == [0] and stats.catchup_gaps_filled == 1
    await c.close_all()


async def test_catchup_gives_up_a_gap_it_cannot_read() -> None:
    """Reads that keep failing are retried; once the hold is far past its bound the
    gap is reported lost (unavailable) and the held envelopes go on."""
    fake, stats = FakeHistory(), HubStats()
    emitted: list[Step] = []
    fake.fail = True
    c, _ = catchup(fake, emitted, stats, hold_max=2)
    for offset in range(3, 9):
        c.offer(env(offset))
    await fake.wait_until(lambda: bool(emitted))
    assert offsets(emitted) == [(Position("e1", 2), "unavailable"), 3, 4, 5, 6, 7, 8]
    await c.close_all()


async def test_resumed_during_a_read_reads_again_and_before_start_reads_at_start() -> None:
    """A resumed report while a read is under way is not lost: another read follows; a
    report before the room's first position makes the start read the history."""
    fake, stats = FakeHistory(), HubStats()
    emitted: list[Step] = []
    c, _ = catchup(fake, emitted, stats)
    fake.gate = asyncio.Event()
    c.resumed([ROOM])
    await fake.wait_until(lambda: len(fake.reads) == 1)
    c.resumed([ROOM])
    fake.gate.set()
    await fake.wait_until(lambda: len(fake.reads) == 2)
    other = Catchup(fake.read, fake.emit([]), stats, limit=100, grace=0.01)
    stream = other.open(ROOM, H)
    other.resumed([ROOM])
    assert stream.recheck
    other.start(stream, Position("e1", 0))
    await fake.wait_until(lambda: len(fake.reads) == 3)
    await c.close_all()
    await other.close_all()


def test_pending_join_queue_is_bounded_and_says_what_it_dropped() -> None:
    """A full queue drops its oldest half; after joined the member is told lost (limit)
    at the newest dropped position, then gets the rest; drops before its position are
    not a loss."""
    join = PendingJoin(ROOM, max_queue=4)
    for offset in range(1, 7):
        join.offer((MESSAGE, "e1", offset, frame(str(offset))))
    assert len(join.queue) <= 4
    frames = join.joined(Position("e1", 1))
    lost = json.loads(frames[0].payload)
    assert lost == {"type": "lost", "room": "r", "epoch": "e1", "offset": 2,
                    "reason": "limit"}
    assert [f.payload for f in frames[1:]] == [b"3", b"4", b"5", b"6"]
    early = PendingJoin(ROOM, max_queue=4)
    for offset in range(1, 7):
        early.offer((MESSAGE, "e1", offset, frame(str(offset))))
    assert [f.payload for f in early.joined(Position("e1", 5))] == [b"6"]
