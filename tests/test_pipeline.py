"""The core flow against a real redis-server and real HTTP: joke_poem in both modes."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from tests.conftest import STREAMS
from tests.support import JOKE, POEM, read_stream, text_of
from tokenbus.schemas.entries import EntryType
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.settings import Settings


@pytest.mark.parametrize("settings", STREAMS, indirect=True)
@pytest.mark.parametrize("mode", ["messages", "custom"])
async def test_joke_poem_lands_in_tag_and_job_streams(
    mode: str, settings: Settings, client: TokenbusClient, streams: Redis, run_burst_worker
) -> None:
    job_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=[mode])
    await run_burst_worker()
    keys = settings.keys

    poem = await read_stream(streams, keys.tag("poem"))
    joke = await read_stream(streams, keys.tag("joke"))
    job = await read_stream(streams, keys.job(job_id))

    poem_chunks = [e for e in poem if e.is_chunk]
    assert poem_chunks, "the poem tag stream is empty"
    assert all("poem" in e.tags and "joke" not in e.tags for e in poem_chunks)
    assert text_of(poem) == POEM
    assert text_of(joke) == JOKE
    expected_type = EntryType.TOKEN if mode == "messages" else EntryType.CUSTOM
    assert {e.type for e in poem_chunks} == {expected_type}
    seqs = [e.seq for e in poem]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    for entry in poem_chunks:
        assert entry.job == job_id and entry.attempt == 1
        assert entry.node == "call_model"
        assert entry.meta["langgraph_node"] == "call_model"
        assert entry.meta["langgraph_step"] == 1
        assert entry.meta["tags"] == ["poem"]
    if mode == "messages":
        assert all(e.meta["ls_model_name"] == settings.model for e in poem_chunks)
        assert all(e.meta["ls_provider"] == "openai" for e in poem_chunks)
    # each tag stream ends with the job's terminal entry
    assert poem[-1].type is EntryType.END and joke[-1].type is EntryType.END

    # the job stream: start, every chunk of both tags in order, one end
    assert job[0].type is EntryType.START and job[0].data["graph"] == "joke_poem"
    assert [e.type for e in job].count(EntryType.END) == 1 and job[-1].type is EntryType.END
    assert [e.seq for e in job] == list(range(len(job)))
    assert text_of(job) == JOKE + POEM
    assert job[-1].data["chunks"] == sum(e.is_chunk for e in job)
    assert 0 < await streams.ttl(keys.job(job_id)) <= settings.job_ttl_s


async def test_messages_mode_carries_usage_and_finish(
    settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    job_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages"])
    await run_burst_worker()
    tokens = [e for e in await read_stream(redis, settings.keys.job(job_id)) if e.type is EntryType.TOKEN]
    # per model call: one chunk with the usage, one with the finish reason, the others neither
    # (the worker encodes a call's repeated data once: what changes must still show)
    assert sum("usage" in e.data for e in tokens) == 2, "stream_usage chunks should carry token usage"
    finish = [e.data.get("response_metadata", {}).get("finish_reason") for e in tokens]
    assert finish.count("stop") == 2 and finish.count(None) == len(tokens) - 2
    assert len({e.data["id"] for e in tokens}) == 2  # one message id per model call


async def test_tag_filter_limits_fan_out(
    settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    job_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages"], tags=["poem"])
    await run_burst_worker()
    keys = settings.keys
    assert await redis.exists(keys.tag("joke")) == 0
    assert text_of(await read_stream(redis, keys.tag("poem"))) == POEM
    assert text_of(await read_stream(redis, keys.job(job_id))) == JOKE + POEM


async def test_tag_streams_expire_when_a_tag_ttl_is_set(
    settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    await client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages"], tags=["poem"])
    await run_burst_worker(tag_ttl_s=900, job_timeout_s=60, max_job_timeout_s=60)
    assert 0 < await redis.ttl(settings.keys.tag("poem")) <= 900
    await client.enqueue("joke_poem", {"topic": "dogs"}, modes=["messages"], tags=["joke"])
    await run_burst_worker()  # the default: tag streams never expire
    assert await redis.ttl(settings.keys.tag("joke")) == -1


def test_a_tag_ttl_shorter_than_a_job_may_run_is_refused(settings: Settings) -> None:
    values = {"TOKENBUS_TAG_TTL": 600, "TOKENBUS_MAX_JOB_TIMEOUT": 900}
    with pytest.raises(ValueError, match=r"TOKENBUS_TAG_TTL \(600s\) must be at least .* 900s"):
        Settings(**values)  # type: ignore[arg-type]
    assert Settings(**{**values, "TOKENBUS_TAG_TTL": 900}).tag_ttl_s == 900  # type: ignore[arg-type]


async def test_idempotent_enqueue_runs_once(
    settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    job_id = f"{settings.prefix}-order-42"  # arq's job ids are global to the Redis database
    first = await client.enqueue("joke_poem", {"topic": "cats"}, job_id=job_id)
    second = await client.enqueue("joke_poem", {"topic": "cats"}, job_id=job_id)
    assert first == second == job_id
    await run_burst_worker()
    job = await read_stream(redis, settings.keys.job(job_id))
    assert [e.type for e in job].count(EntryType.START) == 1


async def test_many_concurrent_jobs_keep_per_job_order(
    settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    ids = [await client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"]) for _ in range(12)]
    await run_burst_worker()
    for job_id in ids:
        job = await read_stream(redis, settings.keys.job(job_id))
        assert [e.seq for e in job] == list(range(len(job)))
        assert text_of(job) == JOKE + POEM
    poem = await read_stream(redis, settings.keys.tag("poem"))
    for job_id in ids:
        assert text_of([e for e in poem if e.job == job_id]) == POEM
