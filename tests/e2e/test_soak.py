"""scripts/soak as users run it (a short run), and the accounting it relies on.

The accounting tests feed ``Ledger`` and the message codec hand-made cases, so a soak
that passes cannot be passing because its checks are blind.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.procs import REPO
from tests.e2e.soakkit import (
    CorruptMessage,
    Ledger,
    Seat,
    Sent,
    decode_msg,
    encode_msg,
    order_problems,
)
from tests.loops import ONE_LOOP

SOAK = REPO / "scripts" / "soak"


async def run_soak(*args: str, timeout: float) -> tuple[int, str]:
    """scripts/soak in a child process; its exit code and output. On a timeout it gets
    SIGTERM (it then stops what it started), then SIGKILL, by PID."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SOAK), *args, cwd=REPO, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace") if out else ""


@pytest.mark.timeout(90)
@ONE_LOOP  # a soak of the default loop keeps the suite short
async def test_short_soak_with_haproxy_and_a_redis_restart(tmp_path: Path) -> None:
    """20 s of mixed traffic through haproxy with Redis killed and restarted midway:
    the soak passes every check and exits 0, having really exercised every kind of
    traffic, churn and the fault (so its checks had something to check)."""
    summary_path = tmp_path / "soak.json"
    code, out = await run_soak("--duration", "20", "--haproxy", "--redis-restart",
                               "--json", str(summary_path), timeout=80)
    assert code == 0, out
    assert "soak passed" in out
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    assert summary["ok"] is True and summary["error"] is None
    failed = [c for c in summary["checks"] if not c["ok"]]
    assert not failed, failed
    names = {c["name"] for c in summary["checks"]}
    assert {"no node crashed", "main: every message accounted for",
            "outage reported to callers", "cross-node delivery resumed within 10 s",
            "node 1: RSS flat after warm-up", "node 1: tasks back to their idle count",
            "node 1: fds other than Redis connections back to baseline"} <= names

    fig = summary["figures"]
    main = fig["traffic"]["main"]
    assert all(count > 20 for count in main["by_kind"].values()), main["by_kind"]
    assert main["joins"] > 20
    assert main["expected_deliveries"] > 500
    assert main["delivered"] > 0.8 * main["expected_deliveries"]
    assert main["reported_undeliverable"] > 0  # the outage was reported, not hidden
    assert main["by_status"].get("failed", 0) > 0
    assert fig["redis_restart_recovery_s"] <= 10
    assert all(r["samples"] >= 5 for r in fig["rss"])
    print(json.dumps({k: fig[k] for k in ("latency_ms", "redis_restart_recovery_s",
                                           "rss")}, indent=1))


@pytest.mark.timeout(120)
@ONE_LOOP  # a soak of the default loop keeps the suite short
async def test_short_soak_recovering_clients_lose_nothing_across_faults(tmp_path: Path) -> None:
    """20 s with recovering roomcast.v1 clients, Redis (AOF always) killed and restarted
    and their extra node SIGKILLed and restarted: they reconnect, recover, and end with
    nothing lost and nothing duplicated; every other check still passes."""
    summary_path = tmp_path / "soak.json"
    code, out = await run_soak("--duration", "20", "--redis-restart", "--redis-aof",
                               "--recovering", "6", "--node-kill",
                               "--json", str(summary_path), timeout=110)
    assert code == 0, out
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    rec = summary["figures"]["recovering"]
    assert rec["lost"] == 0 and rec["duplicated"] == 0 and rec["reported_lost"] == 0, rec
    assert rec["published"] > 50 and rec["node_kills"] == 1, rec
    assert rec["reconnects"] >= 3 and rec["recovered_joins"] >= 3, rec
    print(json.dumps(rec))


@pytest.mark.timeout(60)
@ONE_LOOP  # a soak of the default loop keeps the suite short
async def test_soak_exits_1_when_a_check_fails(tmp_path: Path) -> None:
    """A bound that cannot hold (at most 1 Redis connection per node: the pub/sub link
    alone is one) makes the soak report FAIL for it and exit 1, after stopping what it
    started."""
    summary_path = tmp_path / "soak.json"
    code, out = await run_soak("--duration", "10", "--redis-conn-bound", "1",
                               "--json", str(summary_path), timeout=50)
    assert code == 1, out
    assert "[FAIL] node 1: Redis connections within bound" in out
    assert "soak FAILED" in out
    summary = json.loads(summary_path.read_text())
    assert summary["ok"] is False
    failed = {c["name"] for c in summary["checks"] if not c["ok"]}
    assert failed == {f"node {i}: Redis connections within bound" for i in (1, 2, 3)}


@ONE_LOOP  # a soak of the default loop keeps the suite short
async def test_soak_refuses_bad_arguments() -> None:
    """Usage errors exit 2 with a message, before anything is started."""
    code, out = await run_soak("--duration", "3", timeout=30)
    assert code == 2 and "--duration: at least 10 seconds" in out
    code, out = await run_soak(timeout=30)
    assert code == 2 and "--duration" in out


# -- the codec and the ledger -------------------------------------------------------------


def test_numbered_messages_round_trip_and_damage_is_detected() -> None:
    text = encode_msg("s1", 7, 1000, made_at=12.5)
    assert isinstance(text, str)
    msg = decode_msg(text)
    assert msg is not None
    assert (msg.stream, msg.seq, msg.made_at, msg.size, msg.binary) == ("s1", 7, 12.5,
                                                                      1000, False)
    binary = encode_msg("s1", 8, 30_000, binary=True)
    assert isinstance(binary, bytes)
    decoded = decode_msg(binary)
    assert decoded is not None and decoded.binary and decoded.size == 30_000
    for damaged in (text[:-1], text[:-1] + "!", text.replace("|7|", "|6|"),
                    text[:40] + "x" + text[41:]):
        with pytest.raises(CorruptMessage):
            decode_msg(damaged)
    with pytest.raises(CorruptMessage):
        decode_msg(b"N|\xff\xfe")
    assert decode_msg('{"type": "join", "name": "a", "members": 2}') is None
    assert decode_msg(b"\x00\x01") is None
    with pytest.raises(ValueError):
        encode_msg("a|b", 1)


def test_order_problems() -> None:
    assert order_problems([1, 2, 5, 9]) == (0, 0)
    assert order_problems([1, 2, 2, 3]) == (1, 0)
    assert order_problems([1, 3, 2, 4]) == (0, 1)
    assert order_problems([]) == (0, 0)


def _seat(name: str, node: str, room: str = "r", joined: float = 0.0,
          left: float = 100.0, **streams: list[int]) -> Seat:
    return Seat(name, f"{node}.{name}", node, room, joined, left, dict(streams))


def _sent(seq: int, *, status: str = "ok", at: float = 10.0, origin: str = "n1",
          room: str | None = "r", target: str | None = None, stream: str = "s") -> Sent:
    return Sent(stream, seq, room if target is None else None, target, origin, at, at + 0.1,
                status)


def _evaluate(seats: list[Seat], sent: list[Sent],
              fault: tuple[float, float] | None = None) -> Any:
    ledger = Ledger()
    ledger.seats.extend(seats)
    for s in sent:
        ledger.add_sent(s)
    if fault is not None:
        ledger.add_fault(*fault)
    return ledger.evaluate(grace=2.0)


def test_ledger_accepts_complete_delivery() -> None:
    report = _evaluate([_seat("a", "n1", s=[1, 2]), _seat("b", "n2", s=[1, 2])],
                       [_sent(1), _sent(2)])
    assert report.problems == [] and (report.expected, report.delivered) == (4, 4)


def test_ledger_flags_a_missing_delivery() -> None:
    report = _evaluate([_seat("a", "n1", s=[1, 2]), _seat("b", "n2", s=[1])],
                       [_sent(1), _sent(2)])
    assert report.missing == ["s#2->b(ok)"]


def test_ledger_flags_duplicates_reordering_damage_and_strangers() -> None:
    seat = _seat("a", "n1", s=[1, 3, 2, 3], x=[1])
    seat.corrupt = 1
    report = _evaluate([seat], [_sent(1), _sent(2), _sent(3)])
    assert report.duplicates == ["a<-s x1"]
    assert report.out_of_order == ["a<-s x1"]
    assert report.corrupt == ["a: 1"]
    assert report.unknown == ["a<-x#1"]
    assert len(report.problems) == 4


def test_ledger_flags_misrouted_messages() -> None:
    a, b = _seat("a", "n1", s=[1]), _seat("b", "n2", room="other", s=[1, 2])
    report = _evaluate([a, b], [_sent(1, target="n1.a"), _sent(2)])
    assert report.misrouted == ["s#1 for n1.a at n2.b", "s#2 for room r at b in other"]


def test_ledger_excuses_only_what_it_should() -> None:
    """A failure reported to the sender excuses other nodes, never the sender's own
    node; a fault window excuses other nodes only for messages sent during it; members
    who were not there for the whole send window are not expected to have it."""
    local, remote = _seat("a", "n1"), _seat("b", "n2")
    report = _evaluate([local, remote], [_sent(1, status="failed")])
    assert report.reported_undeliverable == 1
    assert report.missing == ["s#1->a(failed)"]  # local members get it, Redis or not

    report = _evaluate([_seat("b", "n2")], [_sent(1, at=10.0), _sent(2, at=30.0)],
                       fault=(9.0, 20.0))
    assert report.fault_window_losses == 1 and report.missing == ["s#2->b(ok)"]

    report = _evaluate([_seat("late", "n2", joined=10.5), _seat("gone", "n2", left=11.0)],
                       [_sent(1, at=10.0)])
    assert report.expected == 0 and report.problems == []

    report = _evaluate([_seat("b", "n2")], [_sent(1, status="unknown"),
                                            _sent(2, status="gone", target="n2.b")])
    assert report.expected == 0 and report.problems == []
