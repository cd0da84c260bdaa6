"""Helpers shared by the tests: a model server on its own thread, waiting with deadlines."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis

from schemas.entries import Entry
from tokenbus.offline_model import Fault, OfflineModelServer

T = TypeVar("T")

FAULTS = (
    Fault("explode-status", "status"),
    Fault("explode-error", "error", after=3),
    Fault("explode-drop", "disconnect", after=3),
    Fault("stall-forever", "stall", after=2),
)


class ThreadedModelServer:
    """The offline model on its own event loop and thread, so any test loop can call it."""

    def __init__(self, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="model-server", daemon=True)
        self.server = OfflineModelServer(**kwargs)

    def start(self) -> ThreadedModelServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=10)
        return self

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


async def wait_for(
    check: Callable[[], Awaitable[T | None]], *, within: float = 20.0, what: str = "condition"
) -> T:
    """Poll ``check`` until it returns something truthy, or fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    delay = 0.005
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


async def read_stream(redis: Redis, key: str) -> list[Entry]:
    return [Entry.decode(f, id=i.decode(), stream=key) for i, f in await redis.xrange(key, "-", "+")]


def text_of(entries: list[Entry]) -> str:
    return "".join(e.content for e in entries if e.is_chunk)
