"""The benchmark suite: every workload of PERFORMANCE.md, roomcast against its peers.

    python scripts/bench/run.py            # about 10 minutes on 2 cores
    python scripts/bench/run.py --quick    # smaller rooms and fewer rounds, ~4 minutes
    python scripts/bench/run.py --only fanout,latency --servers roomcast,reference
    python scripts/bench/run.py --only inbound --servers roomcast,reference,socketio

Servers: roomcast (scripts/bench/roomcast_node.py, on the event loop ``roomcast serve``
picks by default: uvloop when installed), roomcast@asyncio (the same on asyncio's loop;
``@uvloop`` also works), the minimal reference node (reference_node.py: aiohttp + Redis,
frame encoded once, one write per message per member), python-socketio with
AsyncRedisManager on aiohttp (socketio_node.py) and socket.io 4 on Node.js with
@socket.io/redis-adapter (socketio-node: socketio_js_node.py, which installs the npm
packages into a cache directory on first use; needs node and npm). Each
cluster gets its own private redis-server; every process started is stopped at the end.
The load generator is this process (raw frames over asyncio); node CPU is read from
/proc. Prints Markdown tables with the ratios; paste them into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import _lib
import fanout
import inbound
import latency
import onenode

WORKLOADS = ("fanout", "fanout-concurrent", "compression", "latency", "onenode", "inbound")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def fanout_table(title: str, results: list[fanout.FanoutResult]) -> None:
    by = {r.server: r for r in results}
    rc = by.get("roomcast")
    print(f"\n### {title}\n")
    print("| server | delivered / expected | deliveries/s | CPU µs per delivery (median; rounds) "
          "| CPU vs roomcast |")
    print("|---|---|---|---|---|")
    for r in results:
        rounds = ", ".join(f"{u:.2f}" for u in r.rounds_us)
        vs = ratio(r.us_per_delivery, rc.us_per_delivery) if rc else ""
        print(f"| {r.server} | {r.delivered:,} / {r.expected:,} | {r.rate:,.0f} | "
              f"**{r.us_per_delivery:.2f}** ({rounds}) | {vs} |")


def latency_table(results: list[latency.LatencyResult], members: int) -> None:
    rate = results[0].rate if results else 0
    print(f"\n### Latency, {rate} msg/s into {members:,} members "
          f"({rate * members:,} deliveries/s), publish to receipt on the other node\n")
    print("| server | delivered / expected | p50 ms | p99 ms | max ms | CPU µs per delivery "
          "| same node p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        same = (f"{_lib.percentile(r.local, 0.5) * 1e3:.1f} / "
                f"{_lib.percentile(r.local, 0.99) * 1e3:.1f}")
        print(f"| {r.server} | {r.delivered:,} / {r.expected:,} | {r.quantile(0.5) * 1e3:.1f} | "
              f"{r.quantile(0.99) * 1e3:.1f} | {r.max * 1e3:.1f} | {r.us_per_delivery:.2f} "
              f"| {same} |")


def onenode_table(results: list[onenode.OneNodeResult], ping: float) -> None:
    print(f"\n### One node: idle memory (pings every {ping:g} s), big room, capacity\n")
    print("| server | idle conns | KB RSS per idle conn | idle CPU % | big room: members | "
          "in node ms (median / max) | last receipt ms (median / max) | delivered | "
          "capacity held / tried | accepts/s | RSS MB at capacity |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        in_node = (f"{statistics.median(r.big_in_node_ms):.1f} / {max(r.big_in_node_ms):.1f}"
                   if r.big_in_node_ms else "n/a")
        receipt = (f"{statistics.median(r.big_receipt_ms):.1f} / {max(r.big_receipt_ms):.1f}"
                   if r.big_receipt_ms else "n/a")
        note = f" ({r.error})" if r.error else ""
        print(f"| {r.server} | {r.idle:,} | **{r.idle_kb_per_conn:.1f}** | "
              f"{r.idle_cpu_percent:.1f} | {r.big_members:,} | {in_node} | {receipt} | "
              f"{r.big_delivered:,} / {r.big_expected:,} | {r.held:,} / {r.target:,}{note} | "
              f"{r.accept_per_s:,.0f} | {r.rss_mb:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers",
                        default="roomcast,roomcast@asyncio,reference,socketio,socketio-node")
    parser.add_argument("--only", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    servers = args.servers.split(",")
    only = set(args.only.split(","))
    unknown = only - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    quick = args.quick
    members = 1000
    rounds = 2 if quick else 3
    messages = 200 if quick else 300
    idle = 5000 if quick else 10_000
    capacity = 8000 if quick else 0
    ping = 5.0
    started = time.perf_counter()
    print(f"# roomcast benchmarks, {time.strftime('%Y-%m-%d %H:%M %Z')}\n")
    print(f"Commit {inbound.revision()}.")
    print(f"Machine: {_lib.machine()}; open-file limit per process: "
          f"{onenode.default_capacity() + 1000}. Command: `python scripts/bench/run.py"
          f"{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`")

    if "fanout" in only:
        res = asyncio.run(fanout.run(servers, members, messages, publishers=1, rounds=rounds))
        fanout_table(f"Fan-out, {members:,} members over 2 nodes, {messages} messages of 64 B "
                     f"from 1 publisher, {rounds} rounds", res)
    if "fanout-concurrent" in only:
        res = asyncio.run(fanout.run(servers, members, messages, publishers=10, rounds=rounds))
        fanout_table(f"Fan-out, {members:,} members over 2 nodes, {messages} messages of 64 B "
                     f"from 10 concurrent publishers, {rounds} rounds", res)
    if "compression" in only and "roomcast" in servers:
        res = asyncio.run(fanout.run(["roomcast", "roomcast+deflate"], members, messages,
                                     size=512, publishers=1, rounds=rounds))
        fanout_table(f"Compression: roomcast with permessage-deflate off and on, {members:,} "
                     f"members, {messages} messages of 512 B (text that compresses), "
                     f"1 publisher", res)
        print(f"\nCompressed (RSV1) frames received with deflate on: {res[1].compressed:,}.")
    if "latency" in only:
        lres = asyncio.run(latency.run(servers, members, rate=50, seconds=3 if quick else 4,
                                       rounds=rounds - 1 if quick else 2))
        latency_table(lres, members)
    if "onenode" in only:
        ores = [asyncio.run(onenode.run(s, idle=idle, capacity=capacity, hold=6.0,
                                        ping_interval=ping)) for s in servers]
        onenode_table(ores, ping)
    if "inbound" in only:
        # permessage-deflate too, for the servers that read through a WebSocket reader
        # of their own or aiohttp's (Socket.IO's would measure the same reader again)
        variants = servers + [f"{s}+deflate" for s in servers
                              if s in ("roomcast", "reference")]
        senders, per_client = 200, 300 if quick else 500
        inbound_rounds = 2 if quick else 3
        ires = asyncio.run(inbound.run(variants, senders, per_client, inbound.SIZES,
                                       inbound_rounds))
        print(inbound.table(ires, senders, per_client, inbound_rounds))
    print(f"\n(suite took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
