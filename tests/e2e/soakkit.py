"""Helpers for the fault and soak tests (tests/e2e/test_faults.py, test_soak.py, scripts/soak).

- Numbered, self-checking messages: ``encode_msg``/``decode_msg``. Each carries its
  stream (sender) name, a sequence number, the monotonic time it was made and a digest
  of everything, so a receiver can tell order, duplicates and damage apart.
- ``Member``: a chat member (websockets) that records every numbered message it receives
  (decoded as it arrives), the notices, and which of its own messages the node reported
  as not delivered to other nodes (the chat's ``{"type": "error"}``, which follows the
  sender's own copy of the failed message).
- ``Ledger``: what was sent, by whom, how it was acknowledged, and who was in which room
  when; ``Ledger.evaluate`` accounts for every message (``Report``).
- Processes: ``InstrumentedNode`` runs ``roomcast serve`` with one extra route,
  ``GET /_soak/debug`` (asyncio task count and open fds of the node process), added by
  wrapping ``roomcast.node.cli.create_app`` in the child: the library itself is unchanged.
  ``Cluster`` starts a private redis-server, the nodes and optionally haproxy, and stops
  each by PID.
- ``RecoveringMix``: recovering ``roomcast.v1`` clients and a numbered Publisher in
  rooms of their own, with lost/duplicated counts (issue 12).
- Probes: ``scrape`` (unlabelled /metrics samples), ``debug``, ``rss_bytes``,
  ``fd_count``, ``until``.

Run as ``python -m tests.e2e.soakkit serve ARGS...``: the instrumented node.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from roomcast.broker.publisher import Publisher
from roomcast.shared.errors import PublishError
from roomcast.shared.history import History, HistoryPolicy
from tests.e2e.haproxy import HAProxy
from tests.e2e.procs import REPO, NodeProcess, wait_for_port
from tests.e2e.recovering import Member as RecoveringMember
from tests.redis_server import RedisServer

API_KEY = "soak-api-key"
DEBUG_PATH = "/_soak/debug"

# -- numbered messages -------------------------------------------------------------------

_MAGIC = "N|"
_PATTERN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"


class CorruptMessage(ValueError):
    """A numbered message whose digest does not match its content."""


@dataclass(frozen=True, slots=True)
class Numbered:
    """A decoded numbered message."""

    stream: str
    seq: int
    made_at: float
    """``time.monotonic()`` in the process that made it (this process)."""
    size: int
    binary: bool


def encode_msg(stream: str, seq: int, size: int = 0, *, binary: bool = False,
               made_at: float | None = None) -> str | bytes:
    """A message ``N|digest|stream|seq|made_at|size|filler``; bytes when ``binary``.

    ``size`` is the filler length (the message is about 50 bytes longer). The digest
    covers everything after it, so a truncated, spliced or altered copy is detected.
    """
    if "|" in stream:
        raise ValueError("stream names may not contain '|'")
    made_at = time.monotonic() if made_at is None else made_at
    shift = seq % len(_PATTERN)
    unit = _PATTERN[shift:] + _PATTERN[:shift]
    filler = (unit * (size // len(unit) + 1))[:size]
    body = f"{stream}|{seq}|{made_at:.6f}|{size}|{filler}"
    digest = hashlib.blake2b(body.encode(), digest_size=8).hexdigest()
    text = f"{_MAGIC}{digest}|{body}"
    return text.encode() if binary else text


def decode_msg(data: str | bytes) -> Numbered | None:
    """The numbered message in ``data``; None if it is not one; CorruptMessage if damaged."""
    binary = isinstance(data, bytes)
    try:
        text = data.decode() if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        if data[:2] == _MAGIC.encode():
            raise CorruptMessage("numbered message is not UTF-8") from None
        return None
    if not text.startswith(_MAGIC):
        return None
    try:
        digest, body = text[len(_MAGIC):].split("|", 1)
        stream, seq, made_at, size, filler = body.split("|", 4)
    except ValueError:
        raise CorruptMessage(f"malformed numbered message {text[:60]!r}") from None
    if hashlib.blake2b(body.encode(), digest_size=8).hexdigest() != digest:
        raise CorruptMessage(f"digest mismatch in {text[:60]!r}")
    if len(filler) != int(size):
        raise CorruptMessage("filler length mismatch")
    return Numbered(stream, int(seq), float(made_at), int(size), binary)


def order_problems(seqs: Sequence[int]) -> tuple[int, int]:
    """(duplicates, out-of-order arrivals) in one receiver's sequence of one stream."""
    seen: set[int] = set()
    duplicates = backwards = 0
    last = -math.inf
    for seq in seqs:
        if seq in seen:
            duplicates += 1
        elif seq < last:
            backwards += 1
        seen.add(seq)
        last = max(last, seq)
    return duplicates, backwards


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# -- chat members ------------------------------------------------------------------------


@dataclass(slots=True)
class Received:
    """One numbered message as a member got it."""

    at: float
    stream: str
    seq: int
    latency: float


class Member:
    """A member of the chat demo's ``room`` that records what it receives.

    Every numbered message is decoded as it arrives (``received``; damaged ones are
    counted in ``corrupt``); JSON notices go to ``notices``. Its own numbered messages
    (stream = ``name``) come back to it (the chat includes the sender): their arrival
    time is the acknowledgement (``acked``), and an ``{"type": "error"}`` notice right
    after one marks that message as not delivered to other nodes (``failed``).
    """

    def __init__(self, ws: Any, name: str, room: str) -> None:
        self.ws = ws
        self.name = name
        self.room = room
        headers = ws.response.headers
        self.node: str = headers["X-Roomcast-Node"]
        self.conn_id: str = headers["X-Roomcast-Connection"]
        self.received: list[Received] = []
        self.notices: list[tuple[float, dict[str, Any]]] = []
        self.corrupt: list[str] = []
        self.other: list[str] = []
        self.sent: dict[int, float] = {}
        self.acked: dict[int, float] = {}
        self.failed: set[int] = set()
        self.joined_at = math.nan
        self.left_at = math.inf
        self.closed_at = math.inf
        self.close_code: int | None = None
        self._last_own: int | None = None
        self._changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._seq = 0

    # -- connecting ------------------------------------------------------------------

    @classmethod
    async def join(cls, base_ws_url: str, room: str, name: str, *, timeout: float = 10.0,
                   **connect_kwargs: Any) -> Member:
        """Connect to ``/chat`` and wait for the own join notice (fully joined then)."""
        import websockets  # only the client side needs it

        kwargs: dict[str, Any] = {"max_size": 2**22, "max_queue": 4096,
                                  "open_timeout": timeout}
        kwargs.update(connect_kwargs)
        ws = await websockets.connect(f"{base_ws_url}/chat?room={room}&name={name}", **kwargs)
        member = cls(ws, name, room)
        member._reader = asyncio.create_task(member._read(), name=f"member-{name}")
        try:
            await member.wait_for(lambda: not math.isnan(member.joined_at), timeout,
                                  "own join notice")
        except BaseException:
            await member.close()
            raise
        return member

    async def close(self) -> None:
        """Leave: close the socket (recording when) and stop the reader."""
        if self.left_at == math.inf:
            self.left_at = time.monotonic()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

    @property
    def open(self) -> bool:
        """True while the socket has not been closed (by either side)."""
        return self.closed_at == math.inf

    # -- sending ---------------------------------------------------------------------

    async def send_mixed(self) -> int:
        """Send the next numbered message with a ``mixed_size`` filler; every third one
        binary."""
        seq = self._seq + 1
        return await self.send_numbered(mixed_size(seq), binary=seq % 3 == 0)

    async def send_numbered(self, size: int = 0, *, binary: bool = False) -> int:
        """Send the next numbered message of this member's stream; its sequence number."""
        self._seq += 1
        seq = self._seq
        now = time.monotonic()
        self.sent[seq] = now
        await self.ws.send(encode_msg(self.name, seq, size, binary=binary, made_at=now))
        return seq

    # -- reading ---------------------------------------------------------------------

    def streams(self) -> dict[str, list[int]]:
        """Sequence numbers received, per stream, in arrival order."""
        out: dict[str, list[int]] = defaultdict(list)
        for r in self.received:
            out[r.stream].append(r.seq)
        return out

    def count_from(self, stream: str) -> int:
        """How many numbered messages of ``stream`` arrived."""
        return sum(1 for r in self.received if r.stream == stream)

    async def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Until ``condition()`` holds (checked on every message); AssertionError after
        ``timeout`` seconds, or if the socket closes first."""
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.name}: not within {timeout}s: {what}")
            if not self.open and not condition():
                raise AssertionError(f"{self.name}: closed ({self.close_code}) before {what}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.25))

    async def _read(self) -> None:
        import websockets

        try:
            async for data in self.ws:
                self._on_message(data)
                self._changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed_at = time.monotonic()
            self.close_code = self.ws.close_code
            self._changed.set()

    def _on_message(self, data: str | bytes) -> None:
        now = time.monotonic()
        try:
            msg = decode_msg(data)
        except CorruptMessage as exc:
            self.corrupt.append(str(exc))
            return
        if msg is not None:
            self.received.append(Received(now, msg.stream, msg.seq, now - msg.made_at))
            if msg.stream == self.name:
                self.acked.setdefault(msg.seq, now)
                self._last_own = msg.seq
            return
        if isinstance(data, str) and data.startswith("{"):
            try:
                notice = json.loads(data)
            except ValueError:
                self.other.append(data[:80])
                return
            self.notices.append((now, notice))
            kind = notice.get("type")
            if kind == "join" and notice.get("name") == self.name:
                if math.isnan(self.joined_at):
                    self.joined_at = now
                self._last_own = None
            elif kind == "error" and self._last_own is not None:
                self.failed.add(self._last_own)
                self._last_own = None
            return
        self.other.append(data[:80] if isinstance(data, str) else repr(data[:80]))


class ApiStream:
    """Numbered messages sent one after another through one node's HTTP API.

    One stream goes through one node, each request awaited before the next, so its
    messages are published in order (order is kept per publisher). Every request is
    recorded as a ``Sent``: 202 "ok", 503 "failed", 404 "gone", anything else "unknown".
    """

    def __init__(self, name: str, node_url: str, origin: str,
                 session: aiohttp.ClientSession) -> None:
        if "|" in name:
            raise ValueError("stream names may not contain '|'")
        self.name = name
        self.node_url = node_url
        self.origin = origin
        self.http = session
        self.seq = 0
        self.sent: list[Sent] = []
        self.statuses: Counter[int] = Counter()

    async def mixed_to_room(self, room: str) -> int:
        """``to_room`` with a ``mixed_size`` filler; every fourth message binary."""
        seq = self.seq + 1
        return await self.to_room(room, mixed_size(seq), binary=seq % 4 == 0)

    async def to_room(self, room: str, size: int = 0, *, binary: bool = False) -> int:
        """POST /api/rooms/{room}/messages; the HTTP status (0: no answer)."""
        return await self._post(f"/api/rooms/{room}/messages", room, None, size, binary)

    async def to_connection(self, conn_id: str, size: int = 0, *, binary: bool = False
                            ) -> int:
        """POST /api/connections/{id}/messages; the HTTP status (0: no answer)."""
        return await self._post(f"/api/connections/{conn_id}/messages", None, conn_id,
                                size, binary)

    async def _post(self, path: str, room: str | None, target: str | None, size: int,
                    binary: bool) -> int:
        self.seq += 1
        now = time.monotonic()
        data = encode_msg(self.name, self.seq, size, binary=binary, made_at=now)
        body = data if isinstance(data, bytes) else data.encode()
        headers = {
            "Authorization": f"Bearer {API_KEY}",
            "Content-Type": "application/octet-stream" if binary
            else "text/plain; charset=utf-8",
        }
        try:
            async with self.http.post(self.node_url + path, data=body, headers=headers,
                                      timeout=aiohttp.ClientTimeout(total=15)) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        outcome = {202: "ok", 503: "failed", 404: "gone"}.get(status, "unknown")
        self.sent.append(Sent(self.name, self.seq, room, target, self.origin, now,
                              time.monotonic(), outcome))
        self.statuses[status] += 1
        return status


async def steady(period: float, stop: asyncio.Event, action: Callable[[], Awaitable[Any]]
                 ) -> int:
    """Call ``action`` every ``period`` seconds (on a fixed schedule, not drifting) until
    ``stop`` is set; how many calls were made. The wait is pacing, not synchronisation:
    ``stop`` ends it at once."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    calls = 0
    while not stop.is_set():
        await action()
        calls += 1
        next_at = max(next_at + period, loop.time() - period)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))
    return calls


def mixed_size(seq: int) -> int:
    """Filler sizes from tens of bytes to tens of KB: mostly small, some 2-8 KB, a few
    20-40 KB (every message stays under the default 64 KiB limit)."""
    if seq % 17 == 0:
        return 20_000 + (seq * 7919) % 20_000
    if seq % 5 == 0:
        return 2_000 + (seq * 104_729) % 6_000
    return 20 + (seq * 31) % 400


# -- accounting --------------------------------------------------------------------------


@dataclass(slots=True)
class Sent:
    """One numbered message as its sender saw it."""

    stream: str
    seq: int
    room: str | None
    """The room it was broadcast to; None for a message to one connection."""
    target: str | None
    """The connection id of a message to one connection."""
    origin: str | None
    """Id of the node that took it (local members there get it even if Redis is down)."""
    sent_at: float
    acked_at: float | None = None
    status: str = "unknown"
    """"ok" (taken), "failed" (reported as not delivered to other nodes), "gone" (the
    target connection was no longer open), or "unknown" (no answer seen)."""


@dataclass(slots=True)
class Seat:
    """A member's presence in a room: who, where, when, and what it received."""

    name: str
    conn_id: str
    node: str
    room: str
    joined_at: float
    left_at: float
    streams: dict[str, list[int]]
    corrupt: int = 0


@dataclass
class Report:
    """Every (message, expected receiver) pair accounted for, and what went wrong."""

    messages: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    expected: int = 0
    delivered: int = 0
    reported_undeliverable: int = 0
    """Expected deliveries to other nodes of messages the sender was told had failed."""
    fault_window_losses: int = 0
    """Deliveries to other nodes that did not happen, for messages sent while an injected
    fault was active (at most once: a node without its Redis link misses them)."""
    fault_window_lost: list[Sent] = field(default_factory=list)
    """The messages behind ``fault_window_losses`` (one entry per missed delivery)."""
    missing: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    out_of_order: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    misrouted: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """One line per kind of problem found (empty when everything is accounted for)."""
        out = []
        for label, items in (("missing", self.missing), ("duplicate", self.duplicates),
                             ("out of order", self.out_of_order), ("corrupt", self.corrupt),
                             ("misrouted", self.misrouted),
                             ("received but never sent", self.unknown)):
            if items:
                out.append(f"{len(items)} {label}: {', '.join(items[:5])}"
                           + (" ..." if len(items) > 5 else ""))
        return out


class Ledger:
    """What was sent and who sat where; ``evaluate`` accounts for every message."""

    def __init__(self) -> None:
        self.sent: dict[tuple[str, int], Sent] = {}
        self.seats: list[Seat] = []
        self.faults: list[tuple[float, float]] = []

    def add_sent(self, sent: Sent) -> None:
        key = (sent.stream, sent.seq)
        if key in self.sent:
            raise ValueError(f"{key} recorded twice")
        self.sent[key] = sent

    def add_member(self, member: Member) -> None:
        """The member's seat, and (if it sent) its own messages with their outcomes."""
        self.seats.append(Seat(
            member.name, member.conn_id, member.node, member.room, member.joined_at,
            min(member.left_at, member.closed_at), member.streams(), len(member.corrupt)))
        for seq, at in member.sent.items():
            acked = member.acked.get(seq)
            if seq in member.failed:
                status = "failed"
            elif acked is not None:
                status = "ok"
            else:
                status = "unknown"
            self.add_sent(Sent(member.name, seq, member.room, None, member.node, at, acked,
                               status))

    def add_fault(self, start: float, end: float) -> None:
        """An injected fault was active from ``start`` until the cluster had recovered."""
        self.faults.append((start, end))

    def _in_fault(self, sent: Sent) -> bool:
        end = sent.acked_at if sent.acked_at is not None else sent.sent_at
        return any(start <= end and sent.sent_at <= stop for start, stop in self.faults)

    def evaluate(self, grace: float) -> Report:
        """Account for every message.

        A seat is expected to get a message when it had joined before the message was
        sent and left at least ``grace`` seconds after it was acknowledged; then the
        message must have arrived, unless it went to another node and either its sender
        was told it failed, or it was sent during an injected fault. Every seat's
        sequence per stream must increase strictly (no duplicates), nothing may arrive
        damaged, at a seat it was not meant for, or without having been sent.
        """
        report = Report(messages=len(self.sent))
        report.by_status.update(s.status for s in self.sent.values())
        by_room: dict[str, list[Seat]] = defaultdict(list)
        by_conn: dict[str, Seat] = {}
        for seat in self.seats:
            by_room[seat.room].append(seat)
            by_conn[seat.conn_id] = seat
        got: dict[str, dict[str, set[int]]] = {}
        for seat in self.seats:
            got[seat.conn_id] = {stream: set(seqs) for stream, seqs in seat.streams.items()}
            if seat.corrupt:
                report.corrupt.append(f"{seat.name}: {seat.corrupt}")
            for stream, seqs in seat.streams.items():
                dups, back = order_problems(seqs)
                if dups:
                    report.duplicates.append(f"{seat.name}<-{stream} x{dups}")
                if back:
                    report.out_of_order.append(f"{seat.name}<-{stream} x{back}")
                for seq in set(seqs):
                    sent = self.sent.get((stream, seq))
                    if sent is None:
                        report.unknown.append(f"{seat.name}<-{stream}#{seq}")
                    elif sent.target is not None and sent.target != seat.conn_id:
                        report.misrouted.append(f"{stream}#{seq} for {sent.target} "
                                                f"at {seat.conn_id}")
                    elif sent.room is not None and sent.room != seat.room:
                        report.misrouted.append(f"{stream}#{seq} for room {sent.room} "
                                                f"at {seat.name} in {seat.room}")
        for sent in self.sent.values():
            if sent.status not in ("ok", "failed"):
                continue
            if sent.target is not None:
                seat = by_conn.get(sent.target)
                candidates = [seat] if seat is not None else []
            else:
                candidates = by_room.get(sent.room or "", [])
            acked = sent.acked_at if sent.acked_at is not None else sent.sent_at
            for seat in candidates:
                if not (seat.joined_at <= sent.sent_at and seat.left_at >= acked + grace):
                    continue
                report.expected += 1
                if sent.seq in got[seat.conn_id].get(sent.stream, ()):
                    report.delivered += 1
                elif seat.node != sent.origin and sent.status == "failed":
                    report.reported_undeliverable += 1
                elif seat.node != sent.origin and self._in_fault(sent):
                    report.fault_window_losses += 1
                    report.fault_window_lost.append(sent)
                else:
                    report.missing.append(f"{sent.stream}#{sent.seq}->{seat.name}"
                                          f"({sent.status})")
        return report


# -- processes ---------------------------------------------------------------------------


class InstrumentedNode(NodeProcess):
    """``roomcast serve`` with ``GET /_soak/debug`` added (tasks and fds of the process)."""

    def start(self) -> InstrumentedNode:
        import subprocess

        from tests.e2e.procs import free_port

        for attempt in range(3):
            cmd = [sys.executable, "-m", "tests.e2e.soakkit", "serve", "--host",
                   "127.0.0.1", "--port", str(self.port), *self.args]
            with open(self._log_path, "ab") as log:
                self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log,
                                             stderr=subprocess.STDOUT)
            try:
                wait_for_port(self.port, self.proc)
                return self
            except RuntimeError as exc:
                self.kill()
                log_text = self.log()
                if "already in use" in log_text.lower() and attempt < 2:
                    # the free port we picked was taken meanwhile (other tests run too)
                    self.port = free_port()
                    Path(self._log_path).write_bytes(b"")
                    continue
                raise RuntimeError(f"{exc}; node log:\n{log_text[-3000:]}") from None
            except BaseException:
                self.kill()
                raise
        raise AssertionError("unreachable")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def remove_log(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self._log_path)


class Cluster:
    """A private redis-server, ``nodes`` instrumented nodes and optionally haproxy.

    ``stop()`` kills what it started, by PID, and is safe to call after a partial start.
    """

    def __init__(self, nodes: int = 3, node_args: Sequence[str] = (), *,
                 haproxy: bool = False, check_inter: str = "300ms",
                 keep_logs: bool = False, redis_args: Sequence[str] = ()) -> None:
        self.count = nodes
        self.node_args = list(node_args)
        self.use_haproxy = haproxy
        self.check_inter = check_inter
        self.keep_logs = keep_logs
        self.redis = RedisServer(extra_args=tuple(redis_args))
        self.nodes: list[InstrumentedNode] = []
        self.haproxy: HAProxy | None = None
        self.node_ids: list[str] = []

    def start(self) -> Cluster:
        try:
            self.redis.start()
            for _ in range(self.count):
                node = InstrumentedNode("--redis", self.redis.url, "--api-key", API_KEY,
                                        *self.node_args)
                self.nodes.append(node)
                node.start()
            if self.use_haproxy:
                self.haproxy = HAProxy([f"127.0.0.1:{n.port}" for n in self.nodes],
                                       check_inter=self.check_inter)
                self.haproxy.start()
                self.haproxy.wait_states({f"node{i}": "UP" for i in
                                          range(1, self.count + 1)}, timeout=20)
        except BaseException:
            self.stop()
            raise
        return self

    async def identify(self) -> list[str]:
        """Each node's id (from its /metrics X-Roomcast-Node header), in node order."""
        self.node_ids = []
        async with aiohttp.ClientSession() as http:
            for node in self.nodes:
                async with http.get(node.url + "/metrics") as resp:
                    self.node_ids.append(resp.headers["X-Roomcast-Node"])
        return self.node_ids

    @property
    def ws_url(self) -> str:
        """Where clients connect: haproxy if there is one, else the first node."""
        return self.haproxy.ws_url if self.haproxy is not None else self.nodes[0].ws_url

    def logs(self) -> str:
        """Every node's log, for failure messages."""
        return "\n".join(f"--- node {i + 1} ---\n{n.log()}" for i, n in enumerate(self.nodes))

    def stop(self) -> None:
        try:
            for node in self.nodes:
                node.kill()
            if self.haproxy is not None:
                self.haproxy.cleanup()
        finally:
            self.redis.cleanup()
            if not self.keep_logs:
                for node in self.nodes:
                    node.remove_log()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- probes ------------------------------------------------------------------------------


async def until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str,
                interval: float = 0.05) -> float:
    """Poll ``condition`` until it holds; the seconds it took. AssertionError after
    ``timeout`` naming ``what``."""
    start = time.monotonic()
    deadline = start + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - start


async def scrape(base_url: str, session: aiohttp.ClientSession | None = None
                 ) -> dict[str, float]:
    """Unlabelled samples of ``GET /metrics`` (counters as ``name_total``)."""
    from prometheus_client.parser import text_string_to_metric_families

    async def fetch(http: aiohttp.ClientSession) -> str:
        async with http.get(base_url + "/metrics",
                            timeout=aiohttp.ClientTimeout(total=10)) as resp:
            resp.raise_for_status()
            return await resp.text()

    if session is None:
        async with aiohttp.ClientSession() as http:
            text = await fetch(http)
    else:
        text = await fetch(session)
    return {s.name: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if not s.labels}


async def debug(base_url: str, session: aiohttp.ClientSession | None = None
                ) -> dict[str, Any]:
    """``GET /_soak/debug`` of an InstrumentedNode: tasks, tasks by coroutine, fds."""
    async def fetch(http: aiohttp.ClientSession) -> dict[str, Any]:
        async with http.get(base_url + DEBUG_PATH,
                            timeout=aiohttp.ClientTimeout(total=10)) as resp:
            resp.raise_for_status()
            result: dict[str, Any] = await resp.json()
            return result

    if session is None:
        async with aiohttp.ClientSession() as http:
            return await fetch(http)
    return await fetch(session)


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid`` (entries of /proc/<pid>/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def redis_sockets(pid: int, redis_port: int) -> int:
    """How many of ``pid``'s open fds are TCP connections to ``redis_port`` (from /proc,
    no external tool): the pub/sub link plus the idle and busy command connections."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == redis_port:
                    inodes.add(fields[9])
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:[") and target[8:-1] in inodes:
                count += 1
    return count


# -- the instrumented node (runs in the child) --------------------------------------------


def _describe(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", None) or type(coro).__name__


def _serve_instrumented(argv: list[str]) -> int:
    from aiohttp import web

    import roomcast.node.cli as cli

    original = cli.create_app

    async def debug_handler(request: web.Request) -> web.Response:
        tasks = asyncio.all_tasks()
        by_coro = Counter(_describe(t) for t in tasks)
        return web.json_response({
            "pid": os.getpid(),
            "tasks": len(tasks),
            "by_coro": dict(by_coro),
            "fds": len(os.listdir("/proc/self/fd")),
        })

    def create_app(*args: Any, **kwargs: Any) -> web.Application:
        app = original(*args, **kwargs)
        app.router.add_get(DEBUG_PATH, debug_handler)
        return app

    cli.create_app = create_app  # type: ignore[assignment]
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(_serve_instrumented(sys.argv[1:]))


# -- the recovering client mix (issue 12) --------------------------------------------------

RECOVERING_HISTORY = History(size=1000, ttl=300)
"""The history of every room in a soak with recovering clients (nodes and Publisher)."""
RECOVERING_NODE_ARGS = ("--history-size", str(RECOVERING_HISTORY.size),
                        "--history-ttl", str(int(RECOVERING_HISTORY.ttl)))


class RecoveringMix:
    """Recovering ``roomcast.v1`` clients (``roomcast.node.client`` through
    ``tests.e2e.recovering.Member``) in rooms of their own, and a Publisher sending
    numbered messages (``r:<n>``, one idempotency key each, retried until Redis takes
    them) to those rooms at ``rate`` per second per room.

    ``report`` counts, over every client: messages published to its room that it never
    got (``lost``), that it got more than once or that the server sent again and the
    client dropped (``duplicated``), and losses the server reported honestly (``lost``
    frames, ``joined`` with ``recovered: false``). With Redis restarted with AOF and
    nodes killed, the first two must be 0.
    """

    def __init__(self, redis_url: str, urls: Sequence[str], rooms: Sequence[str],
                 clients: int, rate: float) -> None:
        self.redis_url = redis_url
        self.urls = list(urls)
        self.rooms = list(rooms)
        self.count = clients
        self.rate = rate
        self.members: list[RecoveringMember] = []
        self.published: dict[str, list[int]] = {room: [] for room in self.rooms}
        self.publish_failures = 0
        self.node_kills = 0
        self._publisher = Publisher(redis_url, history=HistoryPolicy(RECOVERING_HISTORY))
        self._next = dict.fromkeys(self.rooms, 0)

    async def start(self) -> None:
        for i in range(self.count):
            member = RecoveringMember(self.urls[i % len(self.urls)],
                                      self.rooms[i % len(self.rooms)], f"rec{i}")
            await member.start()
            self.members.append(member)

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop``; each room in its own loop."""
        def publisher_of(room: str) -> Callable[[], Awaitable[None]]:
            return lambda: self._publish(room, stop)

        await asyncio.gather(*(steady(1 / self.rate, stop, publisher_of(room))
                               for room in self.rooms))

    async def _publish(self, room: str, stop: asyncio.Event, deadline: float = 30.0) -> None:
        self._next[room] += 1
        n = self._next[room]
        until_ = time.monotonic() + deadline
        while True:
            try:
                await self._publisher.publish_to_room(room, f"r:{n}",
                                                      idempotency_key=f"soak-{room}-{n}")
            except PublishError:
                self.publish_failures += 1
                if time.monotonic() > until_:
                    raise
                await asyncio.sleep(0.1)  # retry interval while Redis is away
                continue
            self.published[room].append(n)
            return

    async def kill_node(self, node: NodeProcess, at: float, down: float) -> None:
        """SIGKILL ``node`` at monotonic time ``at``, start it again on its port after
        ``down`` seconds (its clients reconnect to it and recover)."""
        await asyncio.sleep(max(0.0, at - time.monotonic()))  # the fault's moment
        node.kill()
        self.node_kills += 1
        await asyncio.sleep(down)  # the node is down
        port = node.port
        await asyncio.to_thread(node.start)
        if node.port != port:
            raise RuntimeError(f"the killed node could not have its port {port} back")

    async def finish(self, timeout: float = 30.0) -> None:
        """Wait (bounded) until every client has its room's last message, then close
        them all and the Publisher."""
        try:
            for member in self.members:
                last = self.published[member.room][-1:]
                if last:
                    with contextlib.suppress(TimeoutError):  # counted as lost
                        await member.wait_for_number("r", last[0], timeout=timeout)
        finally:
            for member in self.members:
                await member.close()
            await self._publisher.close()

    def report(self) -> dict[str, Any]:
        lost = duplicated = told = reconnects = recovered = 0
        for member in self.members:
            got = member.numbers("r")
            lost += len(set(self.published[member.room]) - set(got))
            duplicated += len(got) - len(set(got)) + member.client.duplicates
            told += len(member.losses) + sum(1 for j in member.joins if j.recovered is False)
            reconnects += len(member.opens) - 1
            recovered += sum(1 for j in member.joins if j.recovered is True)
        return {"clients": len(self.members), "rooms": len(self.rooms),
                "published": sum(len(p) for p in self.published.values()),
                "publish_retries": self.publish_failures, "node_kills": self.node_kills,
                "reconnects": reconnects, "recovered_joins": recovered,
                "lost": lost, "duplicated": duplicated, "reported_lost": told}
