"""Opt-in garbage-collector probe for the bench nodes (all three servers).

``BENCH_GCLOG=1``: print every collection that takes over 5 ms to stderr (generation,
wall time, objects collected), since a full collection of a node holding thousands of
connections is long enough to show in latency percentiles.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from typing import Any


def install() -> None:
    """Register the probe if BENCH_GCLOG is set."""
    if not os.environ.get("BENCH_GCLOG"):
        return
    started = [0.0]

    def probe(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = time.perf_counter() - started[0]
        if took > 0.005:
            print(f"[gc pid {os.getpid()}] gen{info['generation']} {took * 1e3:.1f} ms, "
                  f"{info['collected']} collected, {len(gc.get_objects())} tracked",
                  file=sys.stderr, flush=True)

    gc.callbacks.append(probe)
