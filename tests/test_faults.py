"""Fault injection for real: workers SIGKILLed and SIGTERMed mid-stream, jobs aborted, tries used up.

Each test checks what consumers end up with against the text the model produced. The kill points
are random; the seed is printed and can be fixed with TOKENBUS_FAULT_SEED.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix
from redis.asyncio import Redis

from tests.support import (
    JOKE,
    POEM,
    ThreadedModelServer,
    follow_job,
    read_stream,
    start_worker,
    text_of,
    wait_until,
)
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.worker import job as job_module
from tokenbus.worker.app import build_worker
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.emitter import StreamLimits
from tokenbus.worker.orphans import Sweeper
from tokenbus.worker.redis_client import StreamsRedis
from tokenbus.worker.settings import Settings

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

RUNS = int(os.environ.get("TOKENBUS_FAULT_RUNS", "4"))


@pytest.fixture(scope="module")
def rng() -> random.Random:
    seed = int(os.environ.get("TOKENBUS_FAULT_SEED") or random.SystemRandom().randrange(1 << 30))
    print(f"fault seed: TOKENBUS_FAULT_SEED={seed}")
    return random.Random(seed)


@pytest.fixture
def fast_recovery(settings: Settings, paced_model: ThreadedModelServer) -> Settings:
    """Short timeouts, so that a killed worker's job runs again within seconds."""
    return settings.model_copy(
        update={
            "openai_base_url": paced_model.base_url,
            "job_timeout_s": 4.0,
            "max_job_timeout_s": 4.0,
            "publish_give_up_s": 0.5,
            "lease_s": 2.0,
            "heartbeat_s": 0.3,
            "shutdown_grace_s": 0,
        }
    )


@pytest.fixture
async def fault_client(fast_recovery: Settings) -> AsyncIterator[TokenbusClient]:
    async with await TokenbusClient.connect(fast_recovery) as c:
        yield c


@pytest.mark.parametrize(
    ("mode", "settings"),
    [("messages", "single"), ("custom", "single"), ("custom", "cluster")],  # one cluster case: the suite's time
    indirect=["settings"],
)
async def test_sigkill_at_a_random_token_leaves_one_clean_copy(
    mode: str, fast_recovery: Settings, fault_client: TokenbusClient, streams: StreamsRedis, rng: random.Random
) -> None:
    """On one Redis, and with the streams on a Redis Cluster (the job stream and the tag streams
    on different masters, the queue and its leases on one Redis)."""
    worker = await start_worker(fast_recovery)
    try:
        for _ in range(RUNS // 2 or 1):
            job_id = await fault_client.enqueue("joke_poem", {"topic": "cats"}, modes=[mode])
            kill_at, seen = rng.randint(2, 60), 0

            async def on_chunk(entry: Entry, kill_at: int = kill_at) -> None:
                nonlocal seen, worker
                seen += 1
                if seen == kill_at and entry.attempt == 1:
                    worker.proc.kill()
                    assert await worker.wait() == -signal.SIGKILL
                    worker = await start_worker(fast_recovery)  # takes the job over once arq's claim expires

            view, entries = await follow_job(streams, fast_recovery.prefix, job_id, on_chunk)
            assert (view.status, view.attempt) == (EntryType.END, 2), f"killed at chunk {kill_at}: {view}"
            assert view.text == JOKE + POEM and view.texts == {"joke": JOKE, "poem": POEM}
            newest = [(e.attempt, e.seq) for e in entries if e.attempt == 2]
            assert newest == [(2, s) for s in range(len(newest))], "duplicates or holes in what the consumer saw"
            stream = await read_stream(streams, fast_recovery.keys.job(job_id))
            first = [e for e in stream if e.attempt == 1 and e.is_terminal]
            assert len(first) == 1 and first[0].type is EntryType.ERROR and first[0].retry
            assert "attempt 1 was interrupted" in first[0].error
    finally:
        await worker.stop()


async def test_sigterm_without_grace_requeues_and_the_next_attempt_finishes(
    fast_recovery: Settings, fault_client: TokenbusClient, redis: Redis
) -> None:
    workers = [await start_worker(fast_recovery)]
    job_id = await fault_client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"])

    async def on_chunk(entry: Entry) -> None:
        if entry.attempt == 1 and len(workers) == 1:
            assert await workers[0].stop(signal.SIGTERM) == 0, workers[0].output
            workers.append(await start_worker(fast_recovery))

    try:
        view, entries = await follow_job(redis, fast_recovery.prefix, job_id, on_chunk)
    finally:
        await workers[-1].stop()
    cancelled = [e for e in entries if e.attempt == 1 and e.is_terminal]
    assert cancelled[0].type is EntryType.CANCELLED and cancelled[0].retry
    assert (view.status, view.attempt, view.text) == (EntryType.END, 2, JOKE + POEM)


async def test_sigterm_with_grace_lets_the_job_finish(
    fast_recovery: Settings, fault_client: TokenbusClient, redis: Redis
) -> None:
    settings = fast_recovery.model_copy(update={"shutdown_grace_s": 20})
    worker = await start_worker(settings)
    job_id = await fault_client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages"])
    stopping: list[asyncio.Task[int]] = []

    async def on_chunk(entry: Entry) -> None:
        if not stopping:
            worker.proc.send_signal(signal.SIGTERM)
            stopping.append(asyncio.create_task(worker.wait()))

    view, _ = await follow_job(redis, settings.prefix, job_id, on_chunk)
    assert (view.status, view.attempt, view.text) == (EntryType.END, 1, JOKE + POEM)
    assert await stopping[0] == 0, worker.output


async def test_a_shutdown_that_lands_while_the_end_is_written_does_not_run_the_job_again(
    settings: Settings, client: TokenbusClient, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worst moment for SIGTERM's grace to run out: the job has finished and its final entry is
    being written. The entry lands, and arq must not re-queue the job (it re-queues what a
    shutdown cancels)."""
    writing, gate = asyncio.Event(), asyncio.Event()
    write_terminal = job_module._write_terminal

    async def held_terminal(*args: Any) -> Any:
        writing.set()
        await gate.wait()
        return await write_terminal(*args)

    monkeypatch.setattr(job_module, "_write_terminal", held_terminal)
    worker = build_worker(settings, handle_signals=False, poll_delay_s=0.01)
    running = asyncio.create_task(worker.async_run())
    try:
        job_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"])
        async with asyncio.timeout(30):
            await writing.wait()
        graph_task = worker.job_tasks[job_id]
        closing = asyncio.create_task(worker.close())  # cancels running jobs at once, as a grace's end does
        await wait_until(graph_task.cancelling, what="the cancellation to reach the job")
        gate.set()
        async with asyncio.timeout(30):
            await closing
    finally:
        gate.set()
        await asyncio.gather(running, return_exceptions=True)
    stream = await read_stream(redis, settings.keys.job(job_id))
    assert [(e.type, e.retry) for e in stream if e.is_terminal] == [(EntryType.END, False)]
    assert text_of(stream) == JOKE + POEM
    assert await redis.zscore(settings.queue_name, job_id) is None, "arq re-queued a job that had ended"
    assert not await redis.exists(job_key_prefix + job_id, in_progress_key_prefix + job_id)


async def test_killed_job_out_of_tries_is_closed_when_arq_gives_up(
    fast_recovery: Settings, fault_client: TokenbusClient, redis: Redis
) -> None:
    settings = fast_recovery.model_copy(update={"max_tries": 1})
    worker = await start_worker(settings)
    job_id = await fault_client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"])
    killed = False

    async def on_chunk(entry: Entry) -> None:
        nonlocal worker, killed
        if not killed:  # once: chunks the killed worker wrote are still arriving, and the next worker must live
            killed = True
            worker.proc.kill()
            await worker.wait()
            worker = await start_worker(settings)

    try:
        view, entries = await follow_job(redis, settings.prefix, job_id, on_chunk)
    finally:
        await worker.stop()
    assert view.status is EntryType.ERROR and view.attempt == 1
    assert "attempt 1 stopped without ending it, and the job will not run again" in view.error
    # closed by the worker that claimed it after the lease lapsed (arq's words), or by a sweeper first
    assert "max 1 retries exceeded" in view.error or "max 1 tries reached" in view.error, view.error
    assert entries[-1].is_final and not entries[-1].retry


async def test_abort_cancels_the_job_and_closes_the_model_stream(
    settings: Settings, client: TokenbusClient, redis: Redis, model_server: ThreadedModelServer
) -> None:
    worker = await start_worker(settings)
    try:
        abandoned = model_server.server.streams_abandoned
        job_id = await client.enqueue("joke_poem", {"topic": "stall-forever"}, modes=["custom"])
        got_chunks = asyncio.Event()

        async def on_chunk(entry: Entry) -> None:
            if not got_chunks.is_set():
                got_chunks.set()
                assert await client.abort(job_id, timeout_s=10)

        view, _ = await follow_job(redis, settings.prefix, job_id, on_chunk)
        assert view.status is EntryType.CANCELLED and view.error == "the job was aborted"
        await wait_until(lambda: model_server.server.streams_abandoned > abandoned, what="the HTTP stream to close")
    finally:
        await worker.stop()


async def test_abort_before_the_job_starts_still_ends_it(
    settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    job_id = await client.enqueue("joke_poem", {"topic": "cats"})
    assert await client.abort(job_id)  # recorded; no worker has seen the job yet
    await run_burst_worker()
    view, entries = await follow_job(redis, settings.prefix, job_id)
    assert view.status is EntryType.CANCELLED and view.error == "the job was aborted before it started"
    assert [e.type for e in entries] == [EntryType.CANCELLED]


async def test_sweeper_closes_a_job_nobody_will_run(settings: Settings, redis: Redis) -> None:
    """The fallback when no worker will ever pick the job up again (its arq keys are gone)."""
    keys, limits = settings.keys, StreamLimits(settings.tag_maxlen, settings.job_maxlen, settings.job_ttl_s)
    job_id = f"{settings.prefix}-orphan"
    for entry in (
        Entry(type="start", job=job_id, attempt=2, seq=0, ts=1),
        Entry(type="token", job=job_id, attempt=2, seq=1, ts=1, tags=["poem"]),
    ):
        await redis.xadd(keys.job(job_id), entry.encode())  # type: ignore[arg-type]
        if entry.tags:
            await redis.xadd(keys.tag("poem"), entry.encode())  # type: ignore[arg-type]
    await redis.zadd(keys.running, {job_id: 0})  # its heartbeat stopped long ago
    sweeper = Sweeper(redis, keys, limits, heartbeat_s=0.1)
    assert await sweeper.sweep() == [job_id]
    last = (await read_stream(redis, keys.tag("poem")))[-1]
    assert (last.type, last.attempt, last.seq, last.retry) == (EntryType.ERROR, 2, 2, False)
    assert "attempt 2 stopped without ending it" in last.error
    assert await redis.zscore(keys.running, job_id) is None
    assert await sweeper.sweep() == []
