"""The worker claims each poll's jobs in one round trip, with arq's in-progress keys (real Redis)."""

from __future__ import annotations

import asyncio

from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from redis.asyncio import Redis

from tests.graphs import GATE
from tests.support import follow_job, wait_for, wait_until
from tokenbus.worker.app import build_worker, stop_worker
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.settings import Settings


async def test_a_poll_starts_its_due_jobs_and_leaves_the_others(
    settings: Settings, client: TokenbusClient, redis: Redis
) -> None:
    ids = [await client.enqueue("joke_poem", {"topic": f"topic {i}"}, modes=["messages"]) for i in range(5)]
    elsewhere, later, *due = ids
    await redis.set(in_progress_key_prefix + elsewhere, b"other worker", px=60_000)  # another worker runs it
    await redis.zadd(settings.queue_name, {later: timestamp_ms() + 60_000})  # re-queued for later
    worker = build_worker(settings, handle_signals=False, poll_delay_s=0.05)
    task = asyncio.create_task(worker.async_run())
    try:
        for job in due:
            view, _ = await follow_job(redis, settings.prefix, job)
            assert view.status == "end" and view.chunks > 0, view
        await wait_until(lambda: worker.jobs_complete == len(due), what="arq to record the jobs as complete")
        assert await redis.xlen(settings.keys.job(elsewhere)) == 0  # never started here
        assert await redis.get(in_progress_key_prefix + elsewhere) == b"other worker"  # its claim untouched
        assert await redis.xlen(settings.keys.job(later)) == 0
        # claimed when no longer due (a race with a re-queue), or no longer queued: the claim is dropped
        await worker.start_jobs([later.encode(), b"not-queued"])
        assert later not in worker.tasks and "not-queued" not in worker.tasks
        assert await redis.exists(in_progress_key_prefix + later, in_progress_key_prefix + "not-queued") == 0
        await wait_until(lambda: worker.job_counter == 0, what="every job slot given back")
        assert worker.sem._value == worker.max_jobs + 1  # arq keeps its free slots there (and one for its poll)
    finally:
        await stop_worker(worker, task)


async def test_jobs_running_here_or_elsewhere_leave_the_free_slot_to_a_new_job(
    settings: Settings, client: TokenbusClient, redis: Redis
) -> None:
    """arq lists running jobs (older, so first) with the new ones at every poll; they must not
    take the free slots of the jobs behind them."""
    settings = settings.model_copy(update={"max_jobs": 2, "graphs": {"gated": "tests.graphs:gated"}})
    past = timestamp_ms() - 1000
    for job_id in ("elsewhere-1", "elsewhere-2"):
        await redis.zadd(settings.queue_name, {job_id: past})
        await redis.set(in_progress_key_prefix + job_id, b"other worker", px=60_000)
    worker = build_worker(settings, handle_signals=False, poll_delay_s=0.05)
    task = asyncio.create_task(worker.async_run())
    try:
        gated = await client.enqueue("gated", {}, modes=["custom"])
        await wait_for(lambda: redis.xlen(settings.keys.job(gated)), what="the gated job to start")
        new = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages"])  # one slot left
        view, _ = await follow_job(redis, settings.prefix, new)
        assert view.status == "end" and view.chunks > 0, view
    finally:
        GATE.setdefault("open", asyncio.Event()).set()
        await stop_worker(worker, task)
        GATE.clear()
    assert (await follow_job(redis, settings.prefix, gated))[0].status == "end"


async def test_a_worker_alone_drains_a_backlog_without_looking_ahead(
    settings: Settings, client: TokenbusClient, redis: Redis
) -> None:
    """With more jobs queued than free slots and no other worker, every claim holds: the worker
    never pays the EXISTS look-ahead over the queue (one command per queued job, every poll)."""
    ids = [await client.enqueue("joke_poem", {"topic": f"topic {i}"}, modes=["messages"]) for i in range(8)]
    exists_before = (await redis.info("commandstats")).get("cmdstat_exists", {}).get("calls", 0)
    worker = build_worker(settings.model_copy(update={"max_jobs": 2}), handle_signals=False, poll_delay_s=0.05)
    task = asyncio.create_task(worker.async_run())
    try:
        for job in ids:
            view, _ = await follow_job(redis, settings.prefix, job)
            assert view.status == "end", view
    finally:
        await stop_worker(worker, task)
    assert (await redis.info("commandstats")).get("cmdstat_exists", {}).get("calls", 0) == exists_before
