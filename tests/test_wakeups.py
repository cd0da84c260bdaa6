"""Workers start a job when a client announces it, not at their next poll (real Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from arq.connections import ArqRedis
from redis.asyncio import Redis

from tests.conftest import make_settings
from tests.support import ThreadedModelServer, follow_job, wait_for
from tokenbus.redis_server import RedisServerProcess
from tokenbus.schemas.job import JOB_FUNCTION
from tokenbus.schemas.keys import StreamKeys, wake_channel
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


async def test_an_abort_is_announced_a_running_job_ends_cancelled_before_the_next_poll(
    redis_server: RedisServerProcess, prefix: str, redis: Redis
) -> None:
    """arq sees abort requests when it polls: ``TokenbusClient.abort`` wakes the workers, so a
    cancel does not wait for the next poll (here, an hour away)."""
    slow = ThreadedModelServer(tokens_per_s=20).start()  # joke_poem takes ~10 s
    try:
        settings = make_settings(redis_server.url, slow.base_url, prefix)
        async with running_worker(settings, redis, NEVER_S), await TokenbusClient.connect(settings) as client:
            job_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages"])
            await wait_for(lambda: chunks_written(redis, settings, job_id), what="the job's first chunk")
            assert await client.abort(job_id, timeout_s=60)
            view, _ = await follow_job(redis, settings.prefix, job_id)
            assert view.status == "cancelled" and 0 < view.chunks < 150, view
    finally:
        slow.stop()


async def chunks_written(redis: Redis, settings: Settings, job_id: str) -> bool:
    return await redis.xlen(StreamKeys(settings.prefix).job(job_id)) > 1


async def test_an_unannounced_job_starts_at_the_next_poll(settings: Settings, arq_pool: ArqRedis, redis: Redis) -> None:
    """Enqueuers that do not publish (arq's own client, say) still get their jobs run."""
    async with running_worker(settings, redis, 0.2):
        job = await arq_pool.enqueue_job(JOB_FUNCTION, {"graph": "joke_poem", "input": {"topic": "cats"}})
        assert job is not None
        await finishes(redis, settings, job.job_id)
