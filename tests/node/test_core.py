"""The connection core with plain values: no socket, no event loop, no hub.

Bytes and times go in; the frames it queues (``take_output``), the events it returns,
its state and what it says to do with the socket come out. Every close-code path of
``node.core`` is here: ours, the peer's (1000 echo, 1005 answered 1000), 1001 on
shutdown, protocol faults 1002/1007/1009, 1013 slow consumer, 1011 pong timeout and
error while opening; the keepalive deadlines with the paused-reading exemption; the
slow-consumer rule; refused state transitions.
"""

from __future__ import annotations

import pytest

from roomcast.node.core import (
    ABORT_TIMEOUT,
    CLOSE_TIMEOUT,
    CUT_OFF,
    NOTHING,
    OPENING_ERROR_REASON,
    PING_FRAME,
    PONG_OVERDUE,
    WRITE,
    ConnectionCore,
    ConnectionState,
    deliver,
)
from roomcast.shared.errors import ConnectionClosedError
from roomcast.shared.frames import (
    MessageReader,
    PreparedMessage,
    build_frame,
    close_frame,
    parse_close_payload,
    parse_frame,
    text_frame,
)
from roomcast.shared.ids import ConnectionId
from roomcast.shared.rfc6455 import CloseCode, Opcode

MASK = b"\x01\x02\x03\x04"
LIMIT = 1000
INTERVAL, TIMEOUT = 30.0, 10.0
T0 = 1_000_000.0
"""A time.time() value for the tests' clocks."""


class Core(ConnectionCore):
    """A core whose transport holds ``transport_holds`` unsent bytes (a test sets it)."""

    __slots__ = ("asked", "transport_holds")

    def __init__(self, limit: int = LIMIT, max_size: int = 4096, conn_id: str = "n1.1"
                 ) -> None:
        super().__init__(ConnectionId(conn_id), MessageReader(max_size), limit)
        self.transport_holds = 0
        self.asked = 0

    def unsent_now(self) -> int:
        self.asked += 1
        return self.transport_holds


def opened(limit: int = LIMIT, max_size: int = 4096, conn_id: str = "n1.1") -> Core:
    core = Core(limit, max_size, conn_id)
    core.open(0, T0 + INTERVAL)
    return core


def masked(opcode: Opcode, payload: bytes = b"", *, fin: bool = True) -> bytes:
    return build_frame(opcode, payload, fin=fin, mask_key=MASK)


def client_close(code: int | None = None, reason: str = "") -> bytes:
    payload = b"" if code is None else code.to_bytes(2, "big") + reason.encode()
    return masked(Opcode.CLOSE, payload)


def frames_out(core: ConnectionCore) -> list[tuple[Opcode, bytes]]:
    """What ``take_output`` gives, split back into (opcode, payload) frames."""
    data = core.take_output()
    frames = []
    view = bytearray(data or b"")
    while view:
        parsed = parse_frame(view, expect_masked=False)
        assert parsed is not None
        frames.append((parsed[0].opcode, parsed[0].payload))
        del view[: parsed[1]]
    return frames


def close_of(frame: tuple[Opcode, bytes]) -> tuple[int, str]:
    opcode, payload = frame
    assert opcode is Opcode.CLOSE
    return parse_close_payload(payload)


# -- states ------------------------------------------------------------------------------


def test_a_new_core_is_connecting_and_cannot_send() -> None:
    """Before open(): CONNECTING, push drops frames, require_open and close refuse."""
    core = Core()
    assert core.state is ConnectionState.CONNECTING and not core.is_open
    assert core.push(text_frame("early")) == NOTHING
    assert not core.has_output
    with pytest.raises(ConnectionClosedError, match="connecting"):
        core.require_open()
    with pytest.raises(ConnectionClosedError, match="not open yet"):
        core.begin_close(CloseCode.NORMAL, "")
    assert not core.begin_abort(CloseCode.INTERNAL_ERROR, "x")


def test_open_then_lost_and_the_transitions_that_are_refused() -> None:
    """CONNECTING → OPEN → CLOSING → CLOSED; opening twice, or after CLOSED, raises."""
    core = opened()
    assert core.state is ConnectionState.OPEN and core.is_open
    with pytest.raises(RuntimeError, match="open -> open"):
        core.open(0, T0)
    assert core.begin_close(CloseCode.NORMAL, "")
    assert core.state is ConnectionState.CLOSING
    with pytest.raises(RuntimeError, match="closing -> open"):
        core.open(0, T0)
    assert core.lost() is True
    assert core.state is ConnectionState.CLOSED
    assert core.lost() is True  # once more: still CLOSED, nothing raised
    with pytest.raises(RuntimeError, match="closed -> open"):
        core.open(0, T0)


def test_lost_while_connecting_means_no_on_close() -> None:
    """A socket lost before the handshake finished: CLOSED, and lost() says it never opened."""
    core = Core()
    assert core.lost() is False
    assert core.state is ConnectionState.CLOSED


def test_closing_refuses_sends_with_the_close_code() -> None:
    """Once closing began, require_open raises ConnectionClosedError carrying the code."""
    core = opened()
    core.begin_close(4000, "bye")
    with pytest.raises(ConnectionClosedError) as info:
        core.require_open()
    assert info.value.close_code == 4000
    assert core.push(text_frame("late")) == NOTHING
    assert not core.begin_close(CloseCode.NORMAL, "")  # begun already
    assert not core.begin_abort(CloseCode.INTERNAL_ERROR, "")


# -- the closing handshake ----------------------------------------------------------------


def test_our_close_goes_after_what_was_queued_and_waits_for_the_peer() -> None:
    """begin_close queues the close frame after the frames queued; the socket stays open
    for the peer's answer, which completes the handshake without a second close frame."""
    core = opened()
    core.push(text_frame("last words"))
    assert core.begin_close(4000, "bye")
    assert (core.close_code, core.close_reason) == (4000, "bye")
    out = frames_out(core)
    assert out[0] == (Opcode.TEXT, b"last words")
    assert close_of(out[1]) == (4000, "bye")
    assert core.ending and not core.close_transport
    assert core.abort_after == CLOSE_TIMEOUT
    events = core.receive(client_close(4000), 64, T0)
    assert [e[0] for e in events] == [Opcode.CLOSE]
    assert not core.has_output  # no second close frame
    assert core.close_transport and core.reading_done
    assert core.close_code == 4000


def test_the_peers_close_is_echoed_after_what_was_queued() -> None:
    """The peer's close frame: its code is echoed (1000 here) after the queued frames,
    the core is CLOSING, and the socket is to be closed once that is written."""
    core = opened()
    core.push(text_frame("queued before"))
    core.receive(client_close(CloseCode.NORMAL, "done"), 64, T0)
    assert core.state is ConnectionState.CLOSING
    assert (core.close_code, core.close_reason) == (1000, "done")
    out = frames_out(core)
    assert out[0] == (Opcode.TEXT, b"queued before")
    assert close_of(out[1]) == (1000, "")
    assert core.close_transport and core.abort_after == CLOSE_TIMEOUT
    assert core.receive(masked(Opcode.TEXT, b"after close"), 64, T0) == []


@pytest.mark.parametrize("code", [1001, 1011, 3000, 4999])
def test_the_peers_code_is_echoed(code: int) -> None:
    """Whatever valid code the peer closes with is the code of the answer."""
    core = opened()
    core.receive(client_close(code), 64, T0)
    assert close_of(frames_out(core)[0]) == (code, "")
    assert core.close_code == code


def test_a_close_frame_without_a_code_is_answered_1000() -> None:
    """No status (1005 on our side) may not be sent back: the answer is 1000."""
    core = opened()
    core.receive(client_close(), 64, T0)
    assert core.close_code == CloseCode.NO_STATUS
    assert close_of(frames_out(core)[0]) == (CloseCode.NORMAL, "")


def test_going_away_on_shutdown_is_1001() -> None:
    """What the hub does when the node drains: our close with 1001."""
    core = opened()
    core.begin_close(CloseCode.GOING_AWAY, "server shutting down")
    assert close_of(frames_out(core)[0]) == (1001, "server shutting down")


def test_a_bad_close_code_is_refused_before_anything_changes() -> None:
    """begin_close with a code that may not be sent raises and leaves the core OPEN."""
    core = opened()
    for code in (1005, 1006, 999, 2000):
        with pytest.raises(ValueError):
            core.begin_close(code, "")
    with pytest.raises(ValueError, match="123 bytes"):
        core.begin_close(CloseCode.NORMAL, "x" * 124)
    assert core.state is ConnectionState.OPEN and not core.has_output


# -- protocol faults ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(text_frame("unmasked"), CloseCode.PROTOCOL_ERROR, id="1002-unmasked"),
        pytest.param(masked(Opcode.CONTINUATION, b"x"), CloseCode.PROTOCOL_ERROR,
                     id="1002-orphan-continuation"),
        pytest.param(masked(Opcode.TEXT, b"\xff\xfe"), CloseCode.INVALID_DATA,
                     id="1007-not-utf8"),
        pytest.param(masked(Opcode.BINARY, b"b" * 101), CloseCode.MESSAGE_TOO_BIG,
                     id="1009-too-big"),
    ],
)
def test_a_protocol_fault_closes_with_its_code(data: bytes, code: CloseCode) -> None:
    """A frame the reader refuses: error says why, its close frame is queued with the
    code and the fault as reason, and the socket is to be closed after it."""
    core = opened(max_size=100)
    events = core.receive(masked(Opcode.TEXT, b"fine") + data, 64, T0)
    assert events == [(Opcode.TEXT, "fine")]
    assert core.error is not None and core.error.close_code == code
    assert core.state is ConnectionState.CLOSING and core.reading_done
    assert core.close_code == code and core.close_reason == str(core.error)
    (out,) = frames_out(core)
    assert close_of(out) == (code, str(core.error))
    assert core.close_transport and core.abort_after == CLOSE_TIMEOUT


def test_a_fault_after_our_close_sends_no_second_close_frame() -> None:
    """Our close frame went first: a fault from the peer ends reading, nothing more."""
    core = opened()
    core.begin_close(CloseCode.NORMAL, "")
    frames_out(core)
    core.receive(text_frame("unmasked"), 64, T0)
    assert core.error is not None
    assert not core.has_output
    assert core.close_code == CloseCode.NORMAL and core.close_transport


def test_messages_pings_and_pongs_come_out_in_order() -> None:
    """Data and control frames in any chunking come out as events in order; a ping is
    answered with a pong of the same payload; fragments are joined."""
    core = opened()
    wire = (masked(Opcode.TEXT, b"he", fin=False) + masked(Opcode.PING, b"p1")
            + masked(Opcode.CONTINUATION, b"llo") + masked(Opcode.BINARY, b"\x00\x01")
            + masked(Opcode.PONG, b"x"))
    events = []
    for i in range(len(wire)):  # one byte at a time
        events += core.receive(wire[i : i + 1], 64, T0)
    assert events == [(Opcode.PING, b"p1"), (Opcode.TEXT, "hello"),
                      (Opcode.BINARY, b"\x00\x01"), (Opcode.PONG, b"x")]
    assert frames_out(core) == [(Opcode.PONG, b"p1")]
    assert core.last_pong_time == T0


def test_receive_stops_at_its_limit_and_reads_on() -> None:
    """At most ``limit`` events per receive; the rest waits (pending) until asked."""
    core = opened()
    core.receive(b"".join(masked(Opcode.TEXT, str(i).encode()) for i in range(5)), 2, T0)
    assert core.pending
    assert core.receive(b"", 2, T0) == [(Opcode.TEXT, "2"), (Opcode.TEXT, "3")]
    assert core.receive(b"", 2, T0) == [(Opcode.TEXT, "4")]
    assert not core.pending


# -- the outgoing buffer and the slow-consumer rule ----------------------------------------


def test_frames_of_one_turn_leave_in_one_write_in_order() -> None:
    """The first push says WRITE, the next ones wait behind it; take_output joins them."""
    core = opened()
    assert core.push(b"a") == WRITE
    assert core.push(b"bb") == NOTHING
    assert core.push(b"ccc") == NOTHING
    assert core.take_output() == b"abbccc"
    assert core.take_output() is None
    assert core.push(b"d") == WRITE  # a new turn
    assert core.take_output() == b"d"


def test_a_message_larger_than_the_limit_goes_to_a_client_that_holds_nothing() -> None:
    """One message may exceed send_buffer_limit: nothing was held before it."""
    core = opened(limit=1000)
    big = b"x" * 10_000
    assert core.push(big) == WRITE
    assert core.take_output() is big


def test_a_frame_is_refused_only_when_what_was_held_before_it_is_over_the_limit() -> None:
    """Queued plus unsent bytes over the limit before a frame: refused, cut off with
    1013, what was queued is dropped and only the close frame waits."""
    core = opened(limit=1000)
    assert core.push(b"q" * 600) == WRITE
    assert core.push(b"q" * 400) == NOTHING  # 600 held: fine (1000 after it)
    assert core.push(b"q" * 1) == NOTHING  # 1000 held: not over the limit
    core.transport_holds = 10**9
    assert core.push(b"refused") == CUT_OFF  # 1001 held
    assert core.state is ConnectionState.CLOSING
    assert (core.close_code, core.close_reason) == (1013, "slow consumer")
    (out,) = frames_out(core)
    assert close_of(out) == (1013, "slow consumer")
    assert core.close_transport and core.abort_after == ABORT_TIMEOUT
    assert core.take_cut_off() and not core.take_cut_off()  # reported once
    assert core.push(b"after") == NOTHING


def test_unsent_bytes_count_until_the_transport_says_they_left() -> None:
    """Written bytes count as held (an upper bound) until the core is over the limit;
    then it asks for the real count, and a client that drained keeps its connection."""
    core = opened(limit=1000)
    core.push(b"w" * 5000)
    core.take_output()  # written: 5,000 unsent as far as the core knows
    assert core.asked == 0
    core.transport_holds = 0  # the client read it all meanwhile
    assert core.push(b"next") == WRITE
    assert core.asked == 1
    core.take_output()
    assert core.push(b"and more") == WRITE
    assert core.asked == 1  # within the bound: not asked again
    core.take_output()
    core.transport_holds = 1001  # now it stopped reading
    core.push(b"x" * 2000)
    core.take_output()
    assert core.push(b"refused") == CUT_OFF
    assert core.asked == 2


def test_a_drained_client_of_a_big_message_is_not_cut_off() -> None:
    """After a 16 MiB frame was written and read, the next frames go out."""
    core = opened(limit=1024 * 1024)
    core.push(b"m" * 16 * 1024 * 1024)
    core.take_output()
    core.transport_holds = 512 * 1024  # still reading: half the limit left to send
    assert core.push(b"small") == WRITE
    assert core.push(b"m" * 16 * 1024 * 1024) == NOTHING  # 512 KiB + 5 B held: fine
    assert core.state is ConnectionState.OPEN


def test_an_abort_drops_what_is_queued_and_sends_only_its_close_frame() -> None:
    """The opening error path: 1011 with its reason, nothing else, socket closed soon."""
    core = opened()
    core.push(text_frame("never sent"))
    assert core.begin_abort(CloseCode.INTERNAL_ERROR, OPENING_ERROR_REASON)
    (out,) = frames_out(core)
    assert close_of(out) == (1011, OPENING_ERROR_REASON)
    assert core.close_transport and core.abort_after == ABORT_TIMEOUT
    assert not core.take_cut_off()  # an abort, not a slow consumer


def test_deliver_hands_the_same_bytes_to_every_open_member_but_the_excluded() -> None:
    """One frame object for all; the excluded and the closed get nothing; only the
    first frame of a turn makes a member dirty; a member over the limit is cut off."""
    members = [opened(conn_id=f"n1.{i}") for i in range(4)]
    members[1].begin_close(CloseCode.NORMAL, "")
    members[1].take_output()
    members[3].push(b"q" * 1200)  # holds more than the limit already
    prepared = PreparedMessage(b"hello", binary=False)
    dirty: list[Core] = []
    cut: list[Core] = []
    count = deliver(members, prepared, "n1.2", False, dirty, cut)
    assert count == 1
    assert dirty == [members[0]] and cut == [members[3]]
    assert members[0].take_output() is prepared.frame
    dirty.clear()
    assert not members[2].has_output
    cut.clear()
    count = deliver(members, prepared, None, True, dirty, cut)  # the compressed path
    assert count == 2 and dirty == [members[0], members[2]] and cut == []


# -- keepalive ----------------------------------------------------------------------------


def test_keepalive_pings_when_due_and_a_pong_clears_the_wait() -> None:
    """No ping before first_ping_at; then the ping frame, a deadline of TIMEOUT for its
    pong, and the next ping an interval after the pong."""
    core = opened()
    assert core.keepalive_deadline(TIMEOUT) == T0 + INTERVAL
    assert core.keepalive(T0 + INTERVAL - 1, INTERVAL, TIMEOUT) == NOTHING
    now = T0 + INTERVAL
    assert core.keepalive(now, INTERVAL, TIMEOUT) == WRITE
    assert core.take_output() == PING_FRAME
    assert core.last_ping_time == now
    assert core.keepalive_deadline(TIMEOUT) == now + TIMEOUT
    assert core.keepalive(now + TIMEOUT - 0.1, INTERVAL, TIMEOUT) == NOTHING
    core.receive(masked(Opcode.PONG, b"roomcast"), 64, now + 1)
    assert core.last_pong_time == now + 1
    assert core.keepalive(now + TIMEOUT + 5, INTERVAL, TIMEOUT) == NOTHING
    assert core.keepalive_deadline(TIMEOUT) == now + INTERVAL
    assert core.keepalive(now + INTERVAL, INTERVAL, TIMEOUT) == WRITE


def test_a_pong_timeout_is_overdue_and_the_abort_is_1011() -> None:
    """No pong within TIMEOUT: PONG_OVERDUE; the hub then aborts with 1011."""
    core = opened()
    now = T0 + INTERVAL
    core.keepalive(now, INTERVAL, TIMEOUT)
    core.take_output()
    assert core.keepalive(now + TIMEOUT, INTERVAL, TIMEOUT) == PONG_OVERDUE
    core.begin_abort(CloseCode.INTERNAL_ERROR, "keepalive pong timeout")
    assert close_of(frames_out(core)[0]) == (1011, "keepalive pong timeout")


def test_no_pong_is_awaited_while_the_node_does_not_read() -> None:
    """reading_paused: however late, no timeout (the pong could not be seen) and no
    ping; the next ping is due an interval after reading resumed."""
    core = opened()
    now = T0 + INTERVAL
    core.keepalive(now, INTERVAL, TIMEOUT)
    core.take_output()
    core.reading_paused = True
    later = now + 3600
    assert core.keepalive(later, INTERVAL, TIMEOUT) == NOTHING
    assert core.keepalive(later + 3600, INTERVAL, TIMEOUT) == NOTHING
    assert not core.has_output
    core.reading_paused = False
    assert core.keepalive(later + 3600 + TIMEOUT, INTERVAL, TIMEOUT) == NOTHING
    assert core.keepalive(later + 3600 + INTERVAL, INTERVAL, TIMEOUT) == WRITE


def test_a_keepalive_ping_to_a_client_over_the_limit_cuts_it_off() -> None:
    """The ping is a frame like any other: over the limit, it is refused with 1013."""
    core = opened(limit=10)
    core.push(b"x" * 100)
    core.transport_holds = 0
    assert core.keepalive(T0 + INTERVAL, INTERVAL, TIMEOUT) == CUT_OFF
    assert close_of(frames_out(core)[0]) == (1013, "slow consumer")


def test_a_ping_from_a_client_over_the_limit_cuts_it_off() -> None:
    """A client that pings but does not read is cut off like one that does not read."""
    core = opened(limit=10)
    core.push(b"x" * 100)
    events = core.receive(masked(Opcode.PING, b"flood"), 64, T0)
    assert events == [(Opcode.PING, b"flood")]
    assert core.ending and core.take_cut_off()
    assert frames_out(core) == [(Opcode.CLOSE, close_frame(1013, "slow consumer")[2:])]
