"""Loss is counted, never silent: a job stream whose ``seq``s jump is reported as a gap naming the
missing ``seq``s (an entry deleted, a raw writer's jump); with ``TOKENBUS_WAIT_REPLICAS`` a batch
counts as written only once replicas acknowledged it (a real replica, and none)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from tests.support import (
    JOKE,
    POEM,
    Process,
    entry,
    follow_job,
    read_stream,
    settings_env,
    text_of,
    token,
    wait_for,
    write,
)
from tokenbus.consumer.attempts import Restart
from tokenbus.consumer.jobs import job_result
from tokenbus.consumer.reader import Gap
from tokenbus.consumer.subscribe import subscribe
from tokenbus.redis_server import RedisServerProcess
from tokenbus.schemas.entries import Entry, EntryType, ErrorType
from tokenbus.worker.app import build_worker
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.publisher import Publisher
from tokenbus.worker.settings import Settings

Item = Entry | Gap | Restart


def job_entries(job: str, seqs: list[int], last: int) -> list[Entry]:
    """``start`` (seq 0), a token at each of ``seqs``, and ``end`` at ``last``."""
    return [
        entry(EntryType.START, job, 0),
        *(token(job, s, f"t{s} ") for s in seqs),
        entry(EntryType.END, job, last, data={"chunks": len(seqs), "lost": 0}),
    ]


async def until_final(items: AsyncIterator[Item]) -> list[Item]:
    seen: list[Item] = []
    async with asyncio.timeout(20):
        async for item in items:
            seen.append(item)
            if isinstance(item, Entry) and item.is_final:
                break
    return seen


def gaps(items: list[Item]) -> list[Gap]:
    return [i for i in items if isinstance(i, Gap)]


async def test_an_entry_deleted_from_a_job_stream_is_reported_with_its_seq(
    redis: Redis, settings: Settings, prefix: str
) -> None:
    key = settings.keys.job("j1")
    ids = await write(redis, key, *job_entries("j1", [1, 2, 3, 4, 5], 6))
    await redis.xdel(key, ids[3])  # seq 3
    replay = await until_final(subscribe(redis, jobs=["j1"], prefix=prefix, start="0"))
    [gap] = gaps(replay)
    assert (gap.stream, gap.job, gap.attempt, gap.missing, gap.after, gap.first_available) == (
        key, "j1", 1, (3, 3), ids[2], ids[4],
    )  # fmt: skip
    assert replay.index(gap) == 3  # told before the entry after the hole
    assert "job j1 attempt 1: seq 3 missing" in str(gap)
    view = await job_result(redis, "j1", prefix=prefix)
    assert (view.missing, view.complete, view.text) == (1, False, "t1 t2 t4 t5 ")

    env = settings_env(settings)  # tail says so, and exits 3: what it printed is not the whole output
    tail = await Process.start("tail", "--job", "j1", "--from-start", env=env, name="tail")
    assert await tail.wait() == 3, tail.output
    assert "t1 t2 t4 t5" in tail.stdout[0]
    assert any("seq 3 missing" in line for line in tail.stderr), tail.output


async def test_a_live_reader_reports_a_jump_a_raw_writer_makes_and_not_a_merged_chunk(
    redis: Redis, settings: Settings, prefix: str
) -> None:
    key = settings.keys.job("j2")
    live = asyncio.create_task(until_final(subscribe(redis, jobs=["j2"], prefix=prefix, block_ms=200)))
    await wait_for(lambda: _reading(redis), what="the reader to block")  # "$" resolved before the writes
    merged = entry(EntryType.TOKEN, "j2", 2, content="t2 t3 t4 ", tags=("poem",), n=3)
    ids = await write(redis, key, entry(EntryType.START, "j2", 0), token("j2", 1, "t1 "), merged)
    ids += await write(redis, key, token("j2", 9, "t9 "), entry(EntryType.END, "j2", 10))  # 5-8 never written
    seen = await live
    [gap] = gaps(seen)
    assert (gap.missing, gap.after, gap.first_available) == ((5, 8), ids[2], ids[3])
    assert "seqs 5-8 missing" in str(gap)
    assert text_of([i for i in seen if isinstance(i, Entry)]) == "t1 t2 t3 t4 t9 "


async def test_tag_streams_skip_seqs_by_design_and_report_no_gap(redis: Redis, settings: Settings, prefix: str) -> None:
    key = settings.keys.tag("poem")
    await write(redis, key, token("j3", 2, "a"), token("j3", 5, "b"), entry(EntryType.END, "j3", 9, tags=()))
    seen = await until_final(subscribe(redis, tags=["poem"], prefix=prefix, start="0"))
    assert not gaps(seen) and text_of([i for i in seen if isinstance(i, Entry)]) == "ab"


async def _reading(redis: Redis) -> bool:
    """Whether a client is blocked in XREAD (the live reader is past resolving ``$``)."""
    clients = await redis.client_list()
    return any(c.get("cmd") == "xread" and c.get("flags", "").find("b") >= 0 for c in clients)


# -- WAIT ----------------------------------------------------------------------------------------


@pytest.fixture
def replicated() -> Iterator[tuple[RedisServerProcess, RedisServerProcess]]:
    """A master and its replica, of this test's own."""
    master = RedisServerProcess()
    master.start()
    replica = RedisServerProcess(extra_args=("--replicaof", "127.0.0.1", str(master.port)))
    try:
        replica.start()
        yield master, replica
    finally:
        replica.close()
        master.close()


async def test_with_a_replica_every_entry_is_acknowledged_and_held_by_it(
    replicated: tuple[RedisServerProcess, RedisServerProcess], settings: Settings
) -> None:
    master, replica = replicated
    settings = settings.model_copy(update={"redis_url": master.url, "wait_replicas": 1, "wait_timeout_ms": 5000})
    on_master = Redis.from_url(master.url, socket_timeout=10)
    on_replica = Redis.from_url(replica.url, socket_timeout=10)
    try:

        async def linked() -> bool:
            info = await on_replica.info("replication")
            return info.get("master_link_status") == "up"

        await wait_for(linked, what="the replica to sync")
        async with await TokenbusClient.connect(settings) as client:
            job_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages"])
        publisher = await _run(settings)
        key = settings.keys.job(job_id)
        view = await job_result(on_master, job_id, prefix=settings.prefix)
        # WAIT returned for every batch, the terminal entry's included: the replica holds them all now
        held = await read_stream(on_replica, key)
    finally:
        await on_master.aclose()
        await on_replica.aclose()
    assert (view.status, view.text) == (EntryType.END, JOKE + POEM)
    assert [e.id for e in held] == [e.id for e in await _entries(master, key)]
    assert held[-1].data["unacknowledged"] == 0 and held[-1].data["lost"] == 0
    assert (publisher.entries_unacknowledged, publisher.entries_written > len(held)) == (0, True)


async def test_without_the_replica_a_job_ends_with_an_error_saying_how_many_were_unacknowledged(
    redis: Redis, settings: Settings, client: TokenbusClient
) -> None:
    settings = settings.model_copy(update={"wait_replicas": 1, "wait_timeout_ms": 20})  # a master alone
    job_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages"])
    publisher = await _run(settings)
    view, _ = await follow_job(redis, settings.prefix, job_id)
    last = (await read_stream(redis, settings.keys.job(job_id)))[-1]
    unacked = publisher.entries_unacknowledged
    assert view.status is EntryType.ERROR and last.error_type == ErrorType.PUBLISH_ERROR
    assert "not acknowledged by 1 replica within 20 ms" in view.error, view.error
    assert last.data["unacknowledged"] > 0 and last.data["lost"] == 0
    assert unacked >= last.data["unacknowledged"]  # (and the terminal entry's own copies)
    assert re.search(rf"\b[1-9][0-9]* stream entries of job {job_id} were written but not", view.error), view.error
    print(f"WAIT without a replica: {last.data['unacknowledged']} known unacknowledged at the end, {unacked} in all")


async def _run(settings: Settings) -> Publisher:
    """Run a worker until the queue is empty; its publisher, with what it counted."""
    worker = build_worker(settings, burst=True, handle_signals=False, poll_delay_s=0)
    try:
        await worker.async_run()
        publisher: Publisher = worker.ctx["tokenbus"].publisher
        return publisher
    finally:
        await worker.close()


async def _entries(server: RedisServerProcess, key: str) -> list[Entry]:
    client = Redis.from_url(server.url, socket_timeout=10)
    try:
        return await read_stream(client, key)
    finally:
        await client.aclose()
