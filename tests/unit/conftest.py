"""A publisher on a :class:`~tests.unit.fake_wire.FakeWire`: the real batching, ordering and error
handling, with nothing on the other end."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from tests.unit.fake_wire import FakeWire
from tokenbus.worker import publisher as publisher_module
from tokenbus.worker.publisher import Publisher

StartPublisher = Callable[..., Publisher]


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> FakeWire:
    """The connection every publisher built in this test writes to."""
    fake = FakeWire()
    monkeypatch.setattr(publisher_module, "Wire", lambda redis: fake)
    return fake


@pytest.fixture
async def start_publisher(wire: FakeWire) -> AsyncIterator[StartPublisher]:
    """Start a publisher (with the given options) on ``wire``; each is closed after the test."""
    started: list[Publisher] = []

    def start(**options: Any) -> Publisher:
        publisher = Publisher(cast(Redis, None), **options).start()
        started.append(publisher)
        return publisher

    yield start
    wire.gate.set()
    wire.failures.clear()
    for publisher in started:
        await publisher.close()


@pytest.fixture
async def publisher(start_publisher: StartPublisher) -> Publisher:
    return start_publisher()
