"""The event loops a node must work on, and markers that choose them for a test.

tests/conftest.py runs every async test under tests/node and tests/e2e once per loop
in ``LOOPS`` (test ids ``[asyncio]``, ``[uvloop]``); e2e node processes follow the
loop of the test that starts them (tests/e2e/conftest.py). ``ONE_LOOP`` keeps a test
or module whose subject is not the node's socket path (Redis faults, the soak, the
browser) to one run, on the loop ``roomcast serve --loop auto`` picks where uvloop is
installed, as it is for the tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Final

import pytest
import uvloop

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

LOOPS: Final[Mapping[str, LoopFactory]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
"""By the name ``roomcast serve --loop`` takes."""

DEFAULT_LOOP: Final = "uvloop"
"""What ``--loop auto`` (the default) runs on where uvloop is installed."""

ONE_LOOP: Final = pytest.mark.asyncio(loop_factories=[DEFAULT_LOOP])
BOTH_LOOPS: Final = pytest.mark.asyncio(loop_factories=list(LOOPS))
