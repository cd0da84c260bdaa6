"""Loss is counted, never silent: a job stream whose ``seq``s jump is reported as a gap naming the
missing ``seq``s (an entry deleted, a raw writer's jump); with ``TOKENBUS_WAIT_REPLICAS`` a batch
counts as written only once replicas acknowledged it (a real replica, and none), and on a Redis
Cluster each master's part of it once that master's replicas did (every replica there, and one
master cut off from its replica)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from tests.conftest import make_settings
from tests.support import (
    JOKE,
    POEM,
    Process,
    ThreadedModelServer,
    cut_replication,
    entry,
    follow_job,
    read_stream,
    redis_cli,
    replica_of,
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
from tokenbus.redis_server import RedisClusterProcesses, RedisServerProcess
from tokenbus.schemas.entries import Entry, EntryType, ErrorType
from tokenbus.worker.app import build_worker
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.publisher import Publisher
from tokenbus.worker.redis_client import streams_from_settings
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


# -- WAIT on a Redis Cluster -----------------------------------------------------------------------


@pytest.fixture
async def replicated_cluster() -> AsyncIterator[RedisClusterProcesses]:
    """A cluster of the test's own, 3 masters and a synced replica each: the session's may have
    lost a replica to a failover test, and a test here cuts one off."""
    cluster = RedisClusterProcesses()
    await asyncio.to_thread(cluster.start)
    await asyncio.to_thread(cluster.wait_synced)
    yield cluster
    await asyncio.to_thread(cluster.close)


def _cluster_settings(
    cluster: RedisClusterProcesses, queue: RedisServerProcess, model: ThreadedModelServer, prefix: str, timeout_ms: int
) -> Settings:
    return make_settings(
        queue.url, model.base_url, prefix, TOKENBUS_STREAMS_URL=cluster.url, TOKENBUS_STREAMS_CLUSTER="true",
        TOKENBUS_WAIT_REPLICAS="1", TOKENBUS_WAIT_TIMEOUT_MS=str(timeout_ms),
    )  # fmt: skip


async def _job_apart_from_poem(
    cluster: RedisClusterProcesses, settings: Settings
) -> tuple[str, dict[str, RedisServerProcess]]:
    """A job id whose stream's master is not the poem tag stream's (the job writes to two masters
    at least), and the master of each stream the job writes to (its own, the joke and poem tags')."""
    keys = settings.keys
    poem = await _master_of(cluster, keys.tag("poem"))
    for job_id in (f"{settings.prefix}-{i}" for i in range(1000)):
        master = await _master_of(cluster, keys.job(job_id))
        if master is not poem:
            joke = await _master_of(cluster, keys.tag("joke"))
            return job_id, {keys.job(job_id): master, keys.tag("joke"): joke, keys.tag("poem"): poem}
    raise AssertionError("every job id hashes to the poem tag's master")


async def _master_of(cluster: RedisClusterProcesses, key: str) -> RedisServerProcess:
    """The master serving ``key``, as soon as the node asked sees its link to it up."""

    async def serving() -> RedisServerProcess | None:
        with contextlib.suppress(LookupError):  # its cluster bus link to the master being remade
            return cluster.master_of(key)
        return None

    return await wait_for(serving, what=f"the master of {key}")


async def _replica_of(cluster: RedisClusterProcesses, key: str) -> RedisServerProcess:
    """The connected replica of ``key``'s master."""

    async def known() -> RedisServerProcess | None:
        return replica_of(cluster, key)

    return await wait_for(known, what=f"the replica of {key}'s master")


async def _streams_of(settings: Settings, keys: list[str], job_id: str) -> dict[str, list[Entry]]:
    """The job's entries in each of ``keys``."""
    client = streams_from_settings(settings)
    try:
        return {key: [e for e in await read_stream(client, key) if e.job == job_id] for key in keys}
    finally:
        await client.aclose()


def _waits(node: RedisServerProcess) -> int:
    """``WAIT`` calls ``node`` has run (the cluster is the test's own: all of them the worker's)."""
    found = re.search(r"cmdstat_wait:calls=(\d+)", redis_cli(node, "INFO", "commandstats"))
    return int(found.group(1)) if found else 0


async def test_on_a_cluster_each_master_waits_for_its_replica_and_every_entry_is_acknowledged(
    replicated_cluster: RedisClusterProcesses, redis_server: RedisServerProcess, model_server: ThreadedModelServer,
    prefix: str,
) -> None:  # fmt: skip
    cluster = replicated_cluster
    settings = _cluster_settings(cluster, redis_server, model_server, prefix, 5000)
    job_id, masters = await _job_apart_from_poem(cluster, settings)
    replicas = {key: await _replica_of(cluster, key) for key in masters}
    async with await TokenbusClient.connect(settings) as client:
        await client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages"], job_id=job_id)
    publisher = await _run(settings)
    streams = await _streams_of(settings, list(masters), job_id)

    assert len({m.port for m in masters.values()}) >= 2  # the job's entries went to several masters
    assert all(_waits(master) > 0 for master in masters.values())  # each got its own pipelines' WAITs
    job = streams[settings.keys.job(job_id)]
    assert (job[-1].type, text_of(job)) == (EntryType.END, JOKE + POEM)
    assert (job[-1].data["unacknowledged"], job[-1].data["lost"]) == (0, 0)
    assert publisher.entries_unacknowledged == 0
    assert publisher.entries_written == sum(map(len, streams.values()))
    for key, entries in streams.items():  # WAIT returned for every pipeline: each replica holds them all now
        assert [e.id for e in await _on_replica(replicas[key], key, job_id)] == [e.id for e in entries]


async def test_on_a_cluster_the_entries_of_a_master_cut_off_from_its_replica_are_unacknowledged(
    replicated_cluster: RedisClusterProcesses, redis_server: RedisServerProcess, model_server: ThreadedModelServer,
    prefix: str,
) -> None:  # fmt: skip
    """The poem tag's master loses its replica before the job starts: every entry that went to it
    (and only those) is counted unacknowledged, and the job ends with an ``error`` saying how many
    it knew of when it ended (those still in flight then are counted by the publisher only)."""
    cluster = replicated_cluster
    settings = _cluster_settings(cluster, redis_server, model_server, prefix, 1000)
    keys = settings.keys
    job_id, masters = await _job_apart_from_poem(cluster, settings)
    cut = masters[keys.tag("poem")]
    await cut_replication(await _replica_of(cluster, keys.tag("poem")))
    async with await TokenbusClient.connect(settings) as client:
        await client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages"], job_id=job_id)
    publisher = await _run(settings)
    streams = await _streams_of(settings, list(masters), job_id)

    on_cut = [e for key, entries in streams.items() if masters[key] is cut for e in entries]
    elsewhere = [e for key, entries in streams.items() if masters[key] is not cut for e in entries]
    assert on_cut and elsewhere
    assert publisher.entries_unacknowledged == len(on_cut)  # every entry on the cut master, terminal copies too
    assert publisher.entries_written == len(elsewhere)  # and none of the others
    last = streams[keys.job(job_id)][-1]
    unacked = last.data["unacknowledged"]
    assert (last.type, last.error_type, last.data["lost"]) == (EntryType.ERROR, ErrorType.PUBLISH_ERROR, 0)
    assert 0 < unacked <= len([e for e in on_cut if not e.is_terminal])
    assert (
        f"{unacked} stream entries of job {job_id} were written but not acknowledged by 1 replica within 1000 ms"
        in last.error
    ), last.error
    print(f"WAIT on a cluster, one master cut off: {len(on_cut)} entries there, {unacked} known at the end")


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


async def _on_replica(replica: RedisServerProcess, key: str, job_id: str) -> list[Entry]:
    """``job_id``'s entries in ``key`` as a cluster replica holds them."""
    client = Redis(host="127.0.0.1", port=replica.port, socket_timeout=10, single_connection_client=True)
    try:
        await client.execute_command("READONLY")  # per connection: a replica serves reads after it
        return [e for e in await read_stream(client, key) if e.job == job_id]
    finally:
        await client.aclose()
