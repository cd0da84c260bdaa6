"""Wake-ups on enqueue: a worker starts a new job a round trip after it is queued, not at its next poll.

Clients ``PUBLISH`` to the queue's wake channel (:func:`tokenbus.schemas.keys.wake_channel`) after each job
they enqueue; every worker of the queue listens on a connection of its own and polls arq's queue
as soon as one arrives. Polling goes on every ``TOKENBUS_POLL_DELAY`` for what announces nothing:
jobs deferred or re-queued by arq, enqueuers that do not publish, and a wake-up missed while the
subscription was down (after a reconnect the worker polls once, at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis

from tokenbus.consumer.redis_errors import REDIS_UNAVAILABLE
from tokenbus.worker.background import Background

logger = logging.getLogger(__name__)


class Wakeups(Background):
    """Listens on ``channel``; :meth:`wait` returns at the first wake-up since the last one, or
    after ``timeout_s``."""

    task_name = "tokenbus-wakeups"

    def __init__(self, redis: Redis, channel: str, *, retry_s: float = 0.5) -> None:
        self._redis = redis
        self.channel = channel
        self._retry_s = retry_s
        self._event = asyncio.Event()
        self.subscriptions = 0
        """Times the channel was subscribed to (the first, then after each drop): read by the metrics endpoint."""
        self.failures = 0

    def set(self) -> None:
        """Wake the worker from within (a job slot was freed)."""
        self._event.set()

    async def wait(self, timeout_s: float) -> None:
        if not self._event.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._event.wait()
        self._event.clear()

    async def _loop(self) -> None:
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    self.subscriptions += 1
                    self._event.set()  # a job may have been announced while nobody listened
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self._event.set()
            except REDIS_UNAVAILABLE as e:
                self.failures += 1
                logger.warning("listening for wake-ups on %s failed (%s); retrying", self.channel, e)
                await asyncio.sleep(self._retry_s)
