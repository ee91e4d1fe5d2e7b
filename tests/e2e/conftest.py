"""Node processes follow the event loop of the test that starts them: an async test runs
once per loop (tests/conftest.py) and so do the nodes it starts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e import procs
from tests.loops import LOOPS


def loop_of(item: pytest.Item) -> str | None:
    """The name (in ``tests.loops.LOOPS``) of the event loop an async test runs on; None
    for a test that runs on no loop of ours."""
    callspec = getattr(item, "callspec", None)  # only parametrized tests have one
    if callspec is None:
        return None
    for value in callspec.params.values():
        for name, factory in LOOPS.items():
            if value is factory:
                return name
    return None


@pytest.fixture(autouse=True)
def node_loop(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The ``--loop`` of the nodes this test starts (``NodeProcess`` reads it): the
    test's own event loop, or None (roomcast's default) for a synchronous test."""
    procs.test_loop = loop_of(request.node)
    try:
        yield procs.test_loop
    finally:
        procs.test_loop = None
