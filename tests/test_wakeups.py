"""Workers start a job when a client announces it, not at their next poll (real Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from arq.connections import ArqRedis
from redis.asyncio import Redis

from tests.support import follow_job, wait_for
from tokenbus.schemas.job import JOB_FUNCTION
from tokenbus.schemas.keys import wake_channel
from tokenbus.worker._arq import TokenbusWorker
from tokenbus.worker.app import build_worker, stop_worker
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.settings import Settings

NEVER_S = 3600.0
"""A poll delay no test outlives: a job these workers start was announced (or freed a slot)."""


@asynccontextmanager
async def running_worker(settings: Settings, redis: Redis, poll_delay_s: float) -> AsyncIterator[TokenbusWorker]:
    worker = build_worker(settings, handle_signals=False, poll_delay_s=poll_delay_s)
    assert isinstance(worker, TokenbusWorker)
    task = asyncio.create_task(worker.async_run())
    try:
        await subscribers(redis, settings, lambda n: n == 1, "the worker to listen for wake-ups")
        yield worker
    finally:
        await stop_worker(worker, task)


async def subscribers(redis: Redis, settings: Settings, want: Callable[[int], bool], what: str) -> None:
    channel = wake_channel(settings.queue_name)

    async def count() -> bool:
        return want(dict(await redis.pubsub_numsub(channel))[channel.encode()])

    await wait_for(count, what=what)


async def finishes(redis: Redis, settings: Settings, job_id: str) -> None:
    view, _ = await follow_job(redis, settings.prefix, job_id)
    assert view.status == "end" and view.chunks > 0, view


async def test_an_announced_job_starts_before_the_next_poll(
    settings: Settings, client: TokenbusClient, redis: Redis
) -> None:
    async with running_worker(settings, redis, NEVER_S):
        await finishes(redis, settings, await client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages"]))


async def test_a_job_waiting_for_a_slot_starts_when_one_is_freed(
    settings: Settings, client: TokenbusClient, redis: Redis
) -> None:
    async with running_worker(settings.model_copy(update={"max_jobs": 1}), redis, NEVER_S):
        first, second = [await client.enqueue("joke_poem", {"topic": t}, modes=["messages"]) for t in ("a", "b")]
        await finishes(redis, settings, first)
        await finishes(redis, settings, second)  # announced while the only slot was taken


async def test_wake_ups_resume_after_the_subscription_is_cut(
    settings: Settings, client: TokenbusClient, redis: Redis
) -> None:
    async with running_worker(settings, redis, NEVER_S):
        assert await redis.client_kill_filter(_type="pubsub") >= 1
        await subscribers(redis, settings, lambda n: n == 1, "the worker to subscribe again")
        await finishes(redis, settings, await client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages"]))


async def test_an_unannounced_job_starts_at_the_next_poll(settings: Settings, arq_pool: ArqRedis, redis: Redis) -> None:
    """Enqueuers that do not publish (arq's own client, say) still get their jobs run."""
    async with running_worker(settings, redis, 0.2):
        job = await arq_pool.enqueue_job(JOB_FUNCTION, {"graph": "joke_poem", "input": {"topic": "cats"}})
        assert job is not None
        await finishes(redis, settings, job.job_id)
