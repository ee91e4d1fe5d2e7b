"""Summarise py-spy folded stacks (``-f raw``): where a node's samples, and its CPU per
delivery, went.

    BENCH_PROFILE=/tmp/prof BENCH_PROFILE_NATIVE=1 python scripts/bench/batching.py \\
        --rate 500 --rounds 1 --sparse-rooms 0
    python scripts/bench/profile_summary.py /tmp/prof/uvloop-nodelay-500-r0-*.txt \\
        [--deliveries N --cpu SECONDS] [--rate 250] [--frames] [--functions] [--top 8]

Every sample goes to exactly one of eight buckets, printed as a markdown table with the
share of samples and, given ``--deliveries`` and ``--cpu`` (the node CPU seconds of the
span the files cover, batching.py prints both per round with BENCH_PROFILE set), the
µs of CPU per delivery: a bucket's samples / ``--rate`` / deliveries, except epoll,
which gets the rest of the measured CPU (see ``per_delivery``: py-spy's samples in
``epoll_wait`` are mostly not CPU). The files of one variant (one per node) are added
up.

How a sample is attributed: its frames are read from the leaf (innermost) towards the
root, and the sample goes to the bucket of the **first frame that matches a rule**
(the leaf-most matching frame). The rules, checked in this order for each frame:

1. ``syscall`` -- a socket system call: a libc function ``send``, ``sendto``,
   ``sendmsg``, ``write``, ``writev``, ``recv``, ``recvfrom``, ``recvmsg``, ``read``,
   ``readv`` (also ``__``/``__libc_`` variants), or a frame of CPython's
   ``socketmodule.c`` (``sock_send``: the wrapper that makes the call). Writes and
   reads are split in the detail (``--frames``). Native frames only: use
   ``py-spy --native`` (BENCH_PROFILE_NATIVE=1), else the call hides inside the
   Python frame that makes it (asyncio's ``_SelectorSocketTransport.write``; under
   uvloop, whatever roomcast frame called ``transport.write``).
2. ``epoll`` -- waiting in the loop's selector: libc ``epoll_wait``, ``epoll_pwait``,
   ``epoll_pwait2``, ``epoll_ctl``, or CPython's ``selectmodule.c``. py-spy keeps a
   sample only when the OS shows the thread running or runnable, so this is time in
   the call (and, on a busy machine, woken but waiting for a core), not idle time.
3. ``event loop`` -- the loop's own work: any frame of the ``asyncio`` package or
   ``selectors.py`` (base_events, selector_events, transports, events' ``Handle._run``,
   streams, timeouts, tasks...), of CPython's C accelerator ``_asynciomodule.c``
   (tasks, futures, ``get_running_loop``), of uvloop (``loop.c``, any frame under
   ``uvloop/``) or of libuv (functions named ``uv_*``/``uv__*``).
4. ``roomcast`` -- roomcast's Python: files under ``node/``, ``broker/``, ``shared/``
   (how py-spy shortens roomcast.node etc.) or ``roomcast/``.
5. ``aiohttp`` -- files under ``aiohttp/`` (and its C parsers), ``multidict/``,
   ``yarl/``, except ``run_app``, which is only the root of every stack.
6. ``redis`` -- redis-py (files under ``redis/``) and hiredis (``hiredis/``, its C
   ``read.c``/``reader.c``/``hiredis.c``/``sds.c``, functions named ``redis*``).
7. ``msgpack`` -- files under ``msgpack/``, its C ``_cmsgpack.c``, ``pack*.h``,
   ``unpack*.h``.
8. ``other`` -- the bench app (``scripts/bench/roomcast_node.py``, ``_gcprobe.py``,
   ``_sink.py``: its ``on_message`` handler and the ``timed_flush_all`` wrapper that
   times write passes), and every sample in which no frame matches.

A frame that matches no rule is passed over, so its time goes to the nearest caller
that matches: the interpreter (``ceval.c``, ``object.h``, ``libpython*``, ``gcmodule.c``),
the standard library outside asyncio (``enum``, ``logging``, ``json``...), libc
functions other than the calls above (``getpid``, ``malloc``, ``memcpy``...),
dataclass-generated code (``<string>``) and unknown addresses. So ``getpid`` under
``asyncio.get_running_loop`` counts as event loop work, ``json.dumps`` called by
roomcast as roomcast, a ``send`` made by redis-py for a PUBLISH as the system call.
With ``--frames``, each bucket lists the frames it was attributed to, with the nearest
caller outside the event loop (where the call came from).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

BUCKETS = ("syscall", "epoll", "event loop", "roomcast", "aiohttp", "redis", "msgpack",
           "other")
TITLES = {
    "syscall": "the system call: write/send (and read/recv) on a socket",
    "epoll": "epoll: waiting in the loop's selector",
    "event loop": "the event loop's own work (asyncio Python / uvloop + libuv C)",
    "roomcast": "roomcast's Python (node, broker, shared)",
    "aiohttp": "aiohttp",
    "redis": "Redis client (redis-py, hiredis)",
    "msgpack": "msgpack",
    "other": "other (bench app, unmatched)",
}
_WRITES = frozenset({"send", "sendto", "sendmsg", "write", "writev"})
_READS = frozenset({"recv", "recvfrom", "recvmsg", "read", "readv"})
_EPOLL = frozenset({"epoll_wait", "epoll_pwait", "epoll_pwait2", "epoll_ctl"})
_LINE = re.compile(r":\d+$")
_HIREDIS_C = frozenset({"read.c", "reader.c", "hiredis.c", "sds.c", "net.c"})
_MSGPACK_C = frozenset({"_cmsgpack.c", "_cmsgpack.cpp", "pack.h", "pack_template.h",
                        "unpack.h", "unpack_template.h", "unpack_define.h", "sysdep.h",
                        "buff_converter.h"})
_AIOHTTP_C = frozenset({"_http_parser.c", "reader_c.c", "mask.c", "_http_writer.c",
                        "_helpers.c"})
_BENCH_APP = frozenset({"roomcast_node.py", "_gcprobe.py", "_sink.py"})


@dataclass(frozen=True)
class Frame:
    name: str
    """The function, as py-spy names it (``Class.method`` for Python 3.11+)."""
    file: str
    """py-spy's short file name without the line: ``node/hub.py``, ``loop.c``,
    ``libc.so.6``."""

    @classmethod
    def parse(cls, raw: str) -> Frame:
        name, _, where = raw.strip().partition(" (")
        return cls(name, _LINE.sub("", where.rstrip(")")))

    @property
    def basename(self) -> str:
        return self.file.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"{self.name} ({self.file})" if self.file else self.name


def _syscall_name(name: str) -> str:
    for prefix in ("__libc_", "__"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def classify(frame: Frame) -> str | None:
    """The bucket of one frame, or None when it does not match (passed over)."""
    name, file, base = frame.name, frame.file, frame.basename
    native = not file.endswith(".py") and not file.startswith("<")
    in_libc = base.startswith(("libc.so", "libc-", "libpthread"))
    if native:
        if (in_libc and _syscall_name(name) in _WRITES | _READS) or base == "socketmodule.c":
            return "syscall"
        if (in_libc and name in _EPOLL) or base in ("selectmodule.c", "selectmodule.c.h"):
            return "epoll"
        if (base in ("loop.c", "_asynciomodule.c", "_asynciomodule.c.h")
                or file.startswith("uvloop/") or name.startswith("uv_")):
            return "event loop"
        if base in _AIOHTTP_C:
            return "aiohttp"
        if base in _HIREDIS_C or name.startswith("redis") or file.startswith("hiredis/"):
            return "redis"
        if base in _MSGPACK_C:
            return "msgpack"
        return None
    if file.startswith("asyncio/") or file == "selectors.py" or file.startswith("uvloop/"):
        return "event loop"
    if file.startswith(("node/", "broker/", "shared/", "roomcast/")):
        return "roomcast"
    if file.startswith(("aiohttp/", "multidict/", "yarl/")):
        return None if name == "run_app" else "aiohttp"
    if file.startswith(("redis/", "hiredis/")):
        return "redis"
    if file.startswith("msgpack/"):
        return "msgpack"
    if base in _BENCH_APP and name not in ("<module>", "main"):
        return "other"
    return None


@dataclass
class Attribution:
    bucket: str
    frame: Frame | None
    """The frame the sample was attributed to (None: nothing matched)."""
    caller: Frame | None
    """The nearest frame rootward of it outside the event loop (where the call came
    from), if any."""


def attribute(frames: Sequence[Frame]) -> Attribution:
    """The bucket of one sample: that of its leaf-most matching frame."""
    for i in range(len(frames) - 1, -1, -1):
        bucket = classify(frames[i])
        if bucket is None:
            continue
        caller = None
        for j in range(i - 1, -1, -1):
            outer = classify(frames[j])
            if outer not in (None, "syscall", "epoll", "event loop"):
                caller = frames[j]
                break
        return Attribution(bucket, frames[i], caller)
    return Attribution("other", None, None)


@dataclass
class Summary:
    samples: int = 0
    native: int = 0
    """Samples with at least one native frame."""
    buckets: Counter[str] = field(default_factory=Counter)
    frames: dict[str, Counter[str]] = field(default_factory=dict)
    syscalls: Counter[str] = field(default_factory=Counter)
    """write / read / other samples of the syscall bucket, by where they came from."""
    own: Counter[str] = field(default_factory=Counter)
    """Samples per leaf frame (self time)."""
    inclusive: Counter[str] = field(default_factory=Counter)
    """Samples per frame anywhere on the stack."""

    def add(self, stack: str, count: int) -> None:
        frames = [Frame.parse(raw) for raw in stack.split(";")]
        self.samples += count
        if any(not f.file.endswith(".py") and f.file and not f.file.startswith("<")
               for f in frames):
            self.native += count
        self.own[str(frames[-1])] += count
        for name in {str(f) for f in frames}:
            self.inclusive[name] += count
        a = attribute(frames)
        self.buckets[a.bucket] += count
        key = str(a.frame) if a.frame is not None else "(no frame matched)"
        if a.caller is not None:
            key += f" <- {a.caller.name}"
        self.frames.setdefault(a.bucket, Counter())[key] += count
        if a.bucket == "syscall" and a.frame is not None:
            call = _syscall_name(a.frame.name)
            kind = ("write" if call in _WRITES or "send" in call
                    else "read" if call in _READS or "recv" in call else call)
            source = a.caller.file if a.caller is not None else ""
            area = ("client sockets" if source.startswith(("node/", "roomcast/"))
                    else "Redis" if source.startswith(("redis/", "broker/"))
                    else source or "the loop's, before data_received")
            self.syscalls[f"{kind} ({area})"] += count

    def read(self, path: Path) -> None:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                self.add(stack, int(count))


def table(summary: Summary, *, deliveries: int | None, cpu: float | None,
          rate: float) -> list[str]:
    """The markdown table: bucket, samples, % of samples and, with the deliveries and
    CPU, µs per delivery and % of CPU (see ``per_delivery``)."""
    total = summary.samples or 1
    us = per_delivery(summary, deliveries, cpu, rate)
    per = cpu * 1e6 / deliveries if cpu is not None and deliveries else None
    lines = ["| bucket | samples | % of samples | µs per delivery | % of CPU |",
             "|---|---|---|---|---|"]
    for bucket in BUCKETS:
        n = summary.buckets[bucket]
        cells = "- | -"
        if us is not None and per:
            mark = " (rest)" if bucket == "epoll" else ""
            cells = f"{us[bucket]:.2f}{mark} | {100 * us[bucket] / per:.0f}%"
        lines.append(f"| {TITLES[bucket]} | {n} | {100 * n / total:.1f}% | {cells} |")
    cells = f"**{per:.2f}** | 100%" if per is not None else "- | -"
    lines.append(f"| total (node CPU) | {summary.samples} | 100% | {cells} |")
    return lines


def per_delivery(summary: Summary, deliveries: int | None, cpu: float | None,
                 rate: float) -> dict[str, float] | None:
    """µs of CPU per delivery per bucket, or None without deliveries and CPU.

    Every bucket but epoll: its samples / ``rate`` (the seconds the node spent there)
    per delivery. epoll: the rest of the measured CPU (CPU minus the other buckets),
    not its samples: py-spy's blocking (``--native``) mode reads whether a thread runs
    before it stops it, and a loop thread that went into ``epoll_wait`` meanwhile, or
    was just let go by the previous sample, counts as running. Measured here at 250
    Hz: an idle asyncio loop gave 24 samples in 3 s for 0.01 s of CPU, a loop with a
    1 ms timer 87 samples (0.35 s) for 0.13 s of CPU; py-spy without ``--native``
    gave 0 and 38. The rest also holds what py-spy's stops cost the node (compare
    with a run without profiling). A sample shows where a thread was when it was
    running *or runnable*: time a node waited for a core (on a busy machine, after
    its own write woke the reader) counts in the frame it waited in, mostly a system
    call; the rest comes out smaller, even negative, then.
    """
    if deliveries is None or cpu is None or not deliveries:
        return None
    us = {b: summary.buckets[b] / rate / deliveries * 1e6 for b in BUCKETS}
    us["epoll"] = cpu * 1e6 / deliveries - sum(v for b, v in us.items() if b != "epoll")
    return us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path,
                        help="py-spy raw outputs of one variant (one per node)")
    parser.add_argument("--deliveries", type=int, help="deliveries in the sampled span")
    parser.add_argument("--cpu", type=float,
                        help="node CPU seconds (user+sys, all nodes) in the sampled span")
    parser.add_argument("--rate", type=float, default=250.0,
                        help="py-spy's samples per second (for 'sampled ms')")
    parser.add_argument("--frames", action="store_true",
                        help="list the frames each bucket's samples were attributed to")
    parser.add_argument("--functions", action="store_true",
                        help="also list functions by self time and by inclusive time")
    parser.add_argument("--top", type=int, default=8,
                        help="frames per bucket with --frames (3x that with --functions)")
    args = parser.parse_args()
    if (args.deliveries is None) != (args.cpu is None):
        parser.error("--deliveries and --cpu go together")
    summary = Summary()
    for path in args.files:
        summary.read(path)
    print(f"{summary.samples} samples from {len(args.files)} file(s)"
          + (f"; {args.deliveries:,} deliveries, {args.cpu:.3f} s node CPU "
             f"({1000 * args.cpu:.0f} ms)" if args.cpu is not None else ""))
    if summary.samples and summary.native < summary.samples / 2:
        print("\nWarning: most samples have no native frames (py-spy without --native): "
              "system calls are counted in the Python frames that make them.")
    print()
    print("\n".join(table(summary, deliveries=args.deliveries, cpu=args.cpu,
                          rate=args.rate)))
    if summary.syscalls:
        total = summary.samples
        print("\nSystem call samples by kind and caller: " + "; ".join(
            f"{kind} {100 * n / total:.1f}%" for kind, n in summary.syscalls.most_common()))
    if args.frames:
        for bucket in BUCKETS:
            counter = summary.frames.get(bucket)
            if not counter:
                continue
            print(f"\n{bucket}:")
            for key, n in counter.most_common(args.top):
                print(f"  {100 * n / summary.samples:5.1f}%  {key}")
    if args.functions:
        for title, counts in (("self time", summary.own), ("inclusive time",
                                                           summary.inclusive)):
            print(f"\n{title}")
            for name, n in counts.most_common(3 * args.top):
                print(f"{100 * n / summary.samples:6.1f}%  {name}")


if __name__ == "__main__":
    main()
