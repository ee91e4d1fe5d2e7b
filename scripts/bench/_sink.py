"""The count-only sink every bench node serves with ``--sink`` (the inbound workload)."""

from __future__ import annotations

import asyncio
import time


class Sink:
    """What the sink route received, and when the count last moved.

    Every /stats call arms a 5 ms timer that notes when the count moves, until it has
    not moved for 2 s (a timer always on would cost the idle node 3% CPU here). The
    timer also keeps ``lag``: how late it ran at worst since /stats was last read,
    i.e. the longest the event loop kept everything else (other sockets, Redis
    replies) waiting.
    """

    enabled = False
    messages = 0
    last = 0.0
    lag = 0.0
    _due = 0.0
    _seen = 0
    _still = 0
    _armed = False

    @classmethod
    def arm(cls) -> None:
        cls._still = 0
        if not cls._armed:
            cls._armed = True
            cls._due = time.perf_counter() + 0.005
            asyncio.get_running_loop().call_later(0.005, cls._tick)

    @classmethod
    def _tick(cls) -> None:
        now = time.perf_counter()
        cls.lag = max(cls.lag, now - cls._due)
        cls._due = now + 0.005
        if cls.messages != cls._seen:
            cls._seen = cls.messages
            cls.last = now
            cls._still = 0
        else:
            cls._still += 1
        if cls._still < 400:
            asyncio.get_running_loop().call_later(0.005, cls._tick)
        else:
            cls._armed = False
