"""Rooms with history on one node: deliver each room's messages in stream order, fill
gaps from the history, and bring a joining ``roomcast.v1`` member in without a gap or a
duplicate.

Three parts, the first two without I/O:

- ``StreamTracker`` keeps, per local room with history, the last position this node
  delivered. ``offer(env)`` answers what to deliver now: the next offset is delivered
  (with any held ones that follow it), an offset already passed is a duplicate (the own
  echo of a publish lands here) and is dropped, a later offset is held until the gap is
  filled, and an envelope of another epoch waits for a history read (the old epoch's
  last messages and the new one's first may still be there). ``fill(page)`` merges a
  history read into the stream: the rest of the old epoch, then, if the page is of
  another epoch, a ``Lost`` step (reason epoch) just before the new epoch's first
  message it holds, and the new epoch's messages; what the read cannot supply becomes a
  ``Lost`` step with its reason.
- ``PendingJoin`` is one joining member's view while its history is read: live messages
  are queued, then, once the ``joined`` frame is out, only those after the member's
  position are passed on, until the member has caught up with the tracker.
- ``Catchup`` drives the tracker on the event loop: a gap not filled by pub/sub within
  ``grace`` seconds (or a hold grown past ``hold_max``) is read from the history, as is
  every room whose subscription came back after a lost link (``resumed``) and every
  room that saw a new epoch (at once; a read that finds a new epoch reads it again from
  its start).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final

from roomcast.node.stats import HubStats
from roomcast.node.v1 import lost_frame
from roomcast.shared.envelope import Envelope
from roomcast.shared.errors import BrokerError
from roomcast.shared.frames import PreparedMessage
from roomcast.shared.history import EPOCH, LIMIT, WINDOW, History, HistoryPage, Position
from roomcast.shared.ids import Room

log = logging.getLogger("roomcast.node")

GRACE: Final = 0.5
"""Seconds a gap may wait for pub/sub to fill it before the history is read."""
HOLD_MAX: Final = 1000
"""Envelopes held per room behind a gap before the history is read at once."""
PENDING_MAX: Final = 10_000
"""Messages queued for one joining member while its history is read; past it the oldest
half is dropped and the member is told ``lost`` (reason ``limit``) after ``joined``."""
RETRY_MAX: Final = 5.0
"""Seconds between failed gap reads at most (the delay doubles from ``grace``)."""
UNAVAILABLE: Final = "unavailable"
"""The reason of a gap given up because the history could not be read."""
_RETIRED_KEPT: Final = 4


@dataclass(frozen=True, slots=True)
class Lost:
    """A step: messages before ``position`` cannot be delivered (``reason``)."""

    position: Position
    reason: str


Step = Envelope | Lost
"""What the tracker tells the hub to do for a room, in order."""


class RoomStream:
    """One local room's place in its stream (see ``StreamTracker``)."""

    __slots__ = ("ahead", "early", "epoch", "failures", "held", "history", "offset",
                 "reading", "recheck", "retired", "room", "started", "timer")

    def __init__(self, room: Room, history: History) -> None:
        self.room = room
        self.history = history
        self.started = False
        """False until the first read of the room gave its position (``start``)."""
        self.epoch: str | None = None
        """The epoch of the last delivered position; None while unknown (the first
        read failed: the next envelope sets it)."""
        self.offset = 0
        self.held: dict[int, Envelope] = {}
        """Envelopes after a gap, by offset (all of ``epoch``)."""
        self.ahead: list[Envelope] = []
        """Envelopes of a newer epoch than ``epoch``, waiting for a read: the old epoch's
        last messages and the new one's first may still be in the history."""
        self.early: list[Envelope] = []
        """Envelopes that came before ``start``."""
        self.retired: list[str] = []
        """Epochs this room left: their late envelopes are dropped."""
        self.reading = False
        self.recheck = False
        """Read the history once started: the subscription came back before that."""
        self.timer: asyncio.TimerHandle | None = None
        self.failures = 0

    @property
    def position(self) -> Position | None:
        """The last position delivered, or None while unknown."""
        return None if self.epoch is None else Position(self.epoch, self.offset)

    def _retire(self, epoch: str) -> None:
        self.retired.append(epoch)
        del self.retired[:-_RETIRED_KEPT]


class StreamTracker:
    """The last delivered position of every local room with history (no I/O)."""

    def __init__(self, hold_max: int = HOLD_MAX) -> None:
        self.hold_max = hold_max
        self.rooms: dict[Room, RoomStream] = {}

    def open(self, room: Room, history: History) -> RoomStream:
        """Track ``room`` (it got its first local member); not started yet."""
        stream = self.rooms[room] = RoomStream(room, history)
        return stream

    def close(self, room: Room) -> RoomStream | None:
        """Stop tracking ``room`` (its last local member left)."""
        return self.rooms.pop(room, None)

    def start(self, stream: RoomStream, position: Position | None) -> list[Step]:
        """The room's first read gave ``position`` (None: it failed): deliver from there,
        beginning with the envelopes that arrived before — all of them, also those the
        read already counted (they came after the room was subscribed)."""
        if stream.started:
            return []
        stream.started = True
        early, stream.early = stream.early, []
        if position is not None:
            stream.epoch, stream.offset = position.epoch, position.offset
            # What came on the channel came after the subscription, so after every
            # member here joined: it is theirs even if the read (made later) counts it.
            offsets = [env.offset for env in early if env.epoch == position.epoch]
            if offsets:
                stream.offset = min(stream.offset, min(offsets) - 1)
        steps: list[Step] = []
        for env in early:
            steps.extend(self.feed(stream, env))
        return steps

    def offer(self, env: Envelope) -> list[Step] | None:
        """Steps for a positioned room envelope; None when its room is not tracked."""
        stream = self.rooms.get(Room(env.target))
        if stream is None:
            return None
        return self.feed(stream, env)

    def feed(self, stream: RoomStream, env: Envelope) -> list[Step]:
        """``offer`` for a room's stream already looked up."""
        if not stream.started:
            if len(stream.early) < self.hold_max:
                stream.early.append(env)
            return []  # past the bound: the gap it leaves is read once started
        offset = env.offset
        if env.epoch != stream.epoch:
            if stream.epoch is None:
                stream.epoch, stream.offset = env.epoch, offset
                return [env]
            if env.epoch in stream.retired:
                return []  # a late message of an epoch this room left
            # A new epoch: read the history before going on (what the old epoch still
            # had, and the new one's first messages, may be there). Held like a gap.
            if len(stream.ahead) < self.hold_max:
                stream.ahead.append(env)
            return []
        if offset == stream.offset + 1:
            stream.offset = offset
            if not stream.held:
                return [env]
            return [env, *self._drain(stream)]
        if offset > stream.offset:
            stream.held[offset] = env
        return []

    def _drain(self, stream: RoomStream) -> list[Step]:
        """The held envelopes that now follow the last position, in order."""
        held = stream.held
        out: list[Step] = []
        nxt = stream.offset + 1
        while held:
            env = held.pop(nxt, None)
            if env is None:
                break
            out.append(env)
            nxt += 1
        stream.offset = nxt - 1
        return out

    def fill(self, stream: RoomStream, page: HistoryPage, since: int) -> tuple[list[Step], bool]:
        """Merge a history read (made since offset ``since``) into the stream: the steps,
        and whether it filled a gap (delivered something pub/sub had not)."""
        if not stream.started or stream.epoch is None or page.epoch in stream.retired:
            return [], False
        epoch = stream.epoch
        held = stream.held
        for env in page.envelopes:
            if env.epoch == epoch and env.offset > stream.offset:
                held.setdefault(env.offset, env)
        steps = self._drain(stream)
        filled = bool(steps)
        if page.epoch != epoch:
            # The rest of the old epoch is out (as far as the history kept it); the room
            # goes on in the page's epoch, after a `lost` at its start.
            steps.extend(self._next_epoch(stream, page.epoch, [
                env for env in (*page.envelopes, *stream.ahead) if env.epoch == page.epoch
            ], page.top))
            return steps, False
        if stream.offset < page.top:
            # The page should have held everything up to its top: what it lacks is gone.
            reason = page.gap(Position(epoch, since)) or WINDOW
            below = [offset for offset in held if offset <= page.top]
            skip_to = min(below) - 1 if below else page.top
            stream.offset = skip_to
            steps.append(Lost(Position(epoch, skip_to), reason))
            steps.extend(self._drain(stream))
            filled = False
        return steps, filled

    def _next_epoch(
        self, stream: RoomStream, epoch: str, envelopes: list[Envelope], top: int
    ) -> list[Step]:
        """Leave the stream's epoch for ``epoch``: `lost` just before the first of its
        ``envelopes`` (or at ``top`` when there are none), then those in order; a gap
        among them is `lost` too (``WINDOW``)."""
        assert stream.epoch is not None
        stream._retire(stream.epoch)
        stream.held.clear()
        ahead = [env for env in stream.ahead if env.epoch != epoch]
        stream.ahead = [env for env in ahead if env.epoch not in stream.retired]
        by_offset = {env.offset: env for env in envelopes}
        start = min(by_offset) - 1 if by_offset else top
        stream.epoch, stream.offset = epoch, start
        steps: list[Step] = [Lost(Position(epoch, start), EPOCH)]
        stream.held.update((o, env) for o, env in by_offset.items() if o > start)
        steps.extend(self._drain(stream))
        while stream.held and stream.offset < top:
            skip_to = min(stream.held) - 1
            stream.offset = skip_to
            steps.append(Lost(Position(epoch, skip_to), WINDOW))
            steps.extend(self._drain(stream))
        return steps

    def give_up(self, stream: RoomStream, reason: str) -> list[Step]:
        """The gap cannot be read: skip to the first held envelope (or go on in the
        newer epoch that arrived meanwhile)."""
        if stream.ahead and stream.epoch is not None and not stream.held:
            epoch = stream.ahead[0].epoch
            envelopes = [env for env in stream.ahead if env.epoch == epoch]
            return self._next_epoch(stream, epoch, envelopes,
                                    max(env.offset for env in envelopes))
        if not stream.held or stream.epoch is None:
            return []
        stream.offset = min(stream.held) - 1
        return [Lost(Position(stream.epoch, stream.offset), reason), *self._drain(stream)]


# -- a joining member --------------------------------------------------------------------

MESSAGE: Final = 0
LOST: Final = 1

Item = tuple[int, str | None, int, PreparedMessage | None]
"""(MESSAGE or LOST, epoch or None for a message without a position, offset, frame or
None for a message this member is excluded from)."""


class PendingJoin:
    """A v1 member joining a room with history: what reaches it while its history is read,
    and until it has caught up with the room's stream."""

    __slots__ = ("dropped", "epoch", "max_queue", "offset", "queue", "ready", "room")

    def __init__(self, room: Room, max_queue: int = PENDING_MAX) -> None:
        self.room = room
        self.max_queue = max_queue
        self.queue: list[Item] = []
        self.dropped: tuple[str, int] | None = None
        """The newest positioned item dropped from a full queue (the oldest half goes)."""
        self.ready = False
        """True once its ``joined`` frame is out."""
        self.epoch: str | None = None
        self.offset = 0

    def offer(self, item: Item) -> PreparedMessage | None:
        """The frame to send now for ``item``, or None (queued, duplicate or excluded)."""
        if not self.ready:
            queue = self.queue
            queue.append(item)
            if len(queue) > self.max_queue:
                half = len(queue) // 2
                for _, epoch, offset, _ in queue[:half]:
                    if epoch is not None:
                        self.dropped = (epoch, offset)
                del queue[:half]
            return None
        return self._pass(item)

    def joined(self, position: Position | None) -> list[PreparedMessage]:
        """The ``joined`` frame is out at ``position``: the queued frames to send after
        (after a ``lost`` frame if messages past ``position`` were dropped from a full
        queue)."""
        self.ready = True
        if position is not None:
            self.epoch, self.offset = position.epoch, position.offset
        queue, self.queue = self.queue, []
        frames = []
        dropped, self.dropped = self.dropped, None
        if dropped is not None and (dropped[0] != self.epoch or dropped[1] > self.offset):
            frames.append(lost_frame(self.room, Position(*dropped), LIMIT))
            self.epoch, self.offset = dropped
        for item in queue:
            frame = self._pass(item)
            if frame is not None:
                frames.append(frame)
        return frames

    def _pass(self, item: Item) -> PreparedMessage | None:
        kind, epoch, offset, frame = item
        if epoch is None:
            return frame
        if kind == LOST:
            if epoch == self.epoch and offset <= self.offset:
                return None  # this member's position is already past it
        elif self.epoch is not None and (epoch != self.epoch or offset <= self.offset):
            return None  # sent before its joined frame, or of an epoch it is past
        self.epoch, self.offset = epoch, offset
        return frame

    def caught_up(self, stream: RoomStream | None) -> bool:
        """True once this member is where the room's stream is (it can take the shared
        frames of every member from now on)."""
        if not self.ready:
            return False
        if stream is None:
            return True  # the room is not tracked any more: nothing to filter
        if not stream.started:
            return False
        return stream.epoch == self.epoch and (self.epoch is None or
                                               stream.offset == self.offset)


# -- on the event loop -------------------------------------------------------------------

Read = Callable[[Room, History, int, int], Awaitable[HistoryPage]]
"""Reads a room's history: (room, history, since, limit) -> page."""
Emit = Callable[[Room, list[Step]], None]
"""Carries out the steps for a room's local members."""


class Catchup:
    """Runs the tracker for the hub: offers, gap reads after a grace, resumed rooms."""

    def __init__(self, read: Read, emit: Emit, stats: HubStats, *, limit: int,
                 grace: float = GRACE, hold_max: int = HOLD_MAX) -> None:
        self.tracker = StreamTracker(hold_max)
        self._read = read
        self._emit = emit
        self._stats = stats
        self._limit = limit
        self.grace = grace
        self._tasks: set[asyncio.Task[None]] = set()

    def stream(self, room: Room) -> RoomStream | None:
        """The tracked stream of ``room``, if any."""
        return self.tracker.rooms.get(room)

    def open(self, room: Room, history: History) -> RoomStream:
        """Track a room that got its first local member."""
        old = self.tracker.rooms.get(room)
        if old is not None:
            self._cancel(old)
        return self.tracker.open(room, history)

    def close(self, room: Room) -> None:
        """Stop tracking a room whose last local member left."""
        stream = self.tracker.close(room)
        if stream is not None:
            self._cancel(stream)

    def start(self, stream: RoomStream, position: Position | None) -> None:
        """First position of a room (from a join's read): deliver what waited for it."""
        steps = self.tracker.start(stream, position)
        self._after(stream, steps)
        if stream.recheck and stream.epoch is not None and stream.timer is None:
            stream.recheck = False
            self._schedule(stream, 0.0, force=True)

    def offer(self, env: Envelope) -> bool:
        """Deliver a positioned room envelope in stream order; False if the room is not
        tracked here (not a local room with history)."""
        stream = self.tracker.rooms.get(Room(env.target))
        if stream is None:
            return False
        steps = self.tracker.feed(stream, env)
        if steps:
            self._emit(stream.room, steps)
        if stream.ahead and stream.timer is None and not stream.reading:
            self._schedule(stream, 0.0)  # a new epoch: read at once
        elif stream.held and stream.timer is None and not stream.reading:
            self._schedule(stream, 0.0 if len(stream.held) > self.tracker.hold_max
                           else self.grace)
        elif len(stream.held) > self.tracker.hold_max and stream.timer is not None:
            stream.timer.cancel()
            self._schedule(stream, 0.0)
        return True

    def resumed(self, rooms: Iterable[Room]) -> None:
        """These rooms' subscriptions came back after a gap: read what was missed now."""
        for room in rooms:
            stream = self.tracker.rooms.get(room)
            if stream is None:
                continue
            if not stream.started or stream.epoch is None:
                stream.recheck = True  # its first read may predate the gap
                continue
            if stream.timer is not None:
                stream.timer.cancel()
                stream.timer = None
            self._schedule(stream, 0.0, force=True)

    def _after(self, stream: RoomStream, steps: list[Step]) -> None:
        if steps:
            self._emit(stream.room, steps)
        if stream.held and stream.timer is None and not stream.reading:
            self._schedule(stream, self.grace)

    def _schedule(self, stream: RoomStream, delay: float, *, force: bool = False) -> None:
        if stream.reading:
            if force:
                stream.failures = -1  # read again once the current read is done
            return
        loop = asyncio.get_running_loop()
        stream.timer = loop.call_later(delay, self._begin, stream)

    def _begin(self, stream: RoomStream) -> None:
        stream.timer = None
        if self.tracker.rooms.get(stream.room) is not stream or stream.epoch is None:
            return
        stream.reading = True
        task = asyncio.get_running_loop().create_task(self._fill(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fill(self, stream: RoomStream) -> None:
        since = stream.offset
        again = False
        try:
            page = await self._read(stream.room, stream.history, since, self._limit)
            if page.epoch != stream.epoch and since and page.epoch not in stream.retired:
                # A new epoch may begin below ``since``: read its messages from the start.
                since = 0
                page = await self._read(stream.room, stream.history, since, self._limit)
        except BrokerError as exc:
            stream.failures = max(stream.failures, 0) + 1
            log.warning("could not read the history of room %r to fill a gap (attempt %d): "
                        "%s", stream.room, stream.failures, exc)
            if self.tracker.rooms.get(stream.room) is stream and (
                    len(stream.held) > 2 * self.tracker.hold_max
                    or len(stream.ahead) >= self.tracker.hold_max):
                self._count(self.tracker.give_up(stream, UNAVAILABLE), False, stream)
            stream.reading = False
            if (stream.held or stream.ahead) and self.tracker.rooms.get(stream.room) is stream:
                delay = min(self.grace * 2 ** min(stream.failures, 16), RETRY_MAX)
                self._schedule(stream, delay)
            return
        except Exception:
            stream.reading = False
            log.exception("reading the history of room %r failed", stream.room)
            return
        again = stream.failures < 0
        stream.failures = 0
        stream.reading = False
        if self.tracker.rooms.get(stream.room) is not stream:
            return
        steps, filled = self.tracker.fill(stream, page, since)
        self._count(steps, filled, stream)
        if again or stream.ahead:
            self._schedule(stream, 0.0)
        elif stream.held:
            self._schedule(stream, self.grace)

    def _count(self, steps: list[Step], filled: bool, stream: RoomStream) -> None:
        if filled:
            self._stats.catchup_gaps_filled += 1
        if steps:
            self._emit(stream.room, steps)

    def _cancel(self, stream: RoomStream) -> None:
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None

    async def close_all(self) -> None:
        """Cancel every pending read (the hub is closing)."""
        for stream in self.tracker.rooms.values():
            self._cancel(stream)
        self.tracker.rooms.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
