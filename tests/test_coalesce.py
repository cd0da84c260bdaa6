"""Adaptive coalescing against a real Redis: a publisher held up by Redis (``CLIENT PAUSE WRITE``)
merges the chunks that queue meanwhile; every reader sees each chunk's text once, and the job
stream's ``seq``s stay contiguous (``seq + n``)."""

from __future__ import annotations

import asyncio
import io
import itertools
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from tests.conftest import make_settings
from tests.support import JOKE, POEM, ThreadedModelServer, emit_while_paused, follow_job, read_stream, text_of
from tokenbus.consumer.attempts import Restart
from tokenbus.consumer.jobs import job_result
from tokenbus.consumer.output import Printer
from tokenbus.consumer.reader import Gap
from tokenbus.consumer.subscribe import subscribe
from tokenbus.redis_server import RedisServerProcess
from tokenbus.schemas.entries import Entry
from tokenbus.schemas.keys import StreamKeys
from tokenbus.worker.app import build_worker
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.emitter import JobEmitter, StreamLimits
from tokenbus.worker.publisher import Publisher

CALL = {"langgraph_node": "write", "tags": ["poem", "joke"], "ls_model_name": "m"}


@pytest.fixture
async def paused_redis(own_redis: RedisServerProcess) -> AsyncIterator[Redis]:
    """A client of a server of this test's own: pausing it holds up no other test."""
    client = Redis.from_url(own_redis.url, socket_timeout=30)
    yield client
    await client.execute_command("CLIENT", "UNPAUSE")
    await client.aclose()


def contiguous(entries: list[Entry]) -> bool:
    return all(b.seq == a.seq + a.n for a, b in itertools.pairwise(entries))


async def until_final(items: AsyncIterator[Entry | Gap | Restart]) -> list[Entry | Gap | Restart]:
    seen: list[Entry | Gap | Restart] = []
    async with asyncio.timeout(30):
        async for item in items:
            seen.append(item)
            if isinstance(item, Entry) and item.is_final:
                return seen
    return seen


async def test_chunks_queued_while_redis_is_paused_are_merged_and_read_once(paused_redis: Redis, prefix: str) -> None:
    redis, keys = paused_redis, StreamKeys(prefix)
    words = [f"w{i} " for i in range(40)]
    publisher = Publisher(redis, coalesce_after=1).start()
    try:
        emitter = JobEmitter(publisher, keys, StreamLimits(), "j1", 1)
        merged_while_paused = await emit_while_paused(publisher, emitter, redis, words, CALL)
    finally:
        await publisher.close()

    text = "".join(words)
    job = await read_stream(redis, keys.job("j1"))
    assert merged_while_paused == len(words) - 2  # the first chunk went alone (nothing waited yet)
    assert [e.n for e in job] == [1, 1, len(words) - 1, 1] and contiguous(job) and job[-1].seq == len(words) + 1
    assert text_of(job) == text and job[-1].data == {"chunks": len(words)}
    for tag in ("poem", "joke"):  # each tag stream holds the same merged entry
        assert [(e.seq, e.n, e.content) for e in await read_stream(redis, keys.tag(tag))] == [
            (e.seq, e.n, e.content) for e in job[1:]
        ]

    replay = await until_final(subscribe(redis, jobs=["j1"], prefix=prefix, start="0"))
    assert not [i for i in replay if not isinstance(i, Entry)]  # no gap, no restart
    assert text_of([i for i in replay if isinstance(i, Entry)]) == text
    both_tags = await until_final(subscribe(redis, tags=["poem", "joke"], prefix=prefix, start="0"))
    assert text_of([i for i in both_tags if isinstance(i, Entry)]) == text  # each copy passed on once
    out, err = io.StringIO(), io.StringIO()
    printer = Printer(out, err)  # what `tokenbus tail` prints
    for item in both_tags:
        printer.show(item)
    assert out.getvalue() == text + "\n"
    view = await job_result(redis, "j1", prefix=prefix)
    assert (view.text, view.texts["poem"], view.chunks, view.missing, view.complete) == (
        text, text, len(words), 0, True,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["messages", "custom"])
async def test_a_worker_coalesces_while_redis_holds_it_up_and_the_text_is_exact(
    paused_redis: Redis, own_redis: RedisServerProcess, paced_model: ThreadedModelServer, prefix: str, mode: str
) -> None:
    redis = paused_redis
    settings = make_settings(
        own_redis.url, paced_model.base_url, prefix, TOKENBUS_COALESCE="adaptive", TOKENBUS_COALESCE_AFTER=1
    )
    async with await TokenbusClient.connect(settings) as client:
        job_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=[mode])
    worker = build_worker(settings, burst=True, handle_signals=False, poll_delay_s=0)
    run = asyncio.create_task(worker.async_run())
    paused = False

    async def pause_once(entry: Entry) -> None:
        nonlocal paused
        if not paused:  # at the first chunk: the model goes on while the publisher waits
            paused = True
            await redis.execute_command("CLIENT", "PAUSE", 400, "WRITE")

    try:
        view, seen = await follow_job(redis, prefix, job_id, pause_once)
        async with asyncio.timeout(60):
            await run
        merged = worker.ctx["tokenbus"].publisher.chunks_merged
    finally:
        await worker.close()
    job = await read_stream(redis, settings.keys.job(job_id))
    assert merged > 0 and max(e.n for e in job) > 1, "nothing was merged: the pause proved nothing"
    assert (view.text, view.missing, view.complete) == (JOKE + POEM, 0, True)
    assert text_of(seen) == JOKE + POEM and contiguous(job)
    assert (
        view.chunks
        == job[-1].data["chunks"]
        == sum(e.n for e in job if e.is_chunk)
        > len([e for e in job if e.is_chunk])
    )
    print(f"{mode}: {view.chunks} chunks in {len([e for e in job if e.is_chunk])} entries ({merged} merged)")
