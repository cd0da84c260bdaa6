"""Failover under load: a worker streams a paced job into a Redis Cluster, and the master holding
both the job's stream and one of its tag streams is killed mid-stream; its replica takes over.

Replication to that replica is cut first, so the entries the master acknowledges from then on
are lost with it for certain (Redis replicates asynchronously: a real failover loses what the
replica had not received, the same way, only fewer). The counts are printed and must agree:
what the publisher counted written = what the streams hold + what was acknowledged and lost;
every lost job-stream entry a reader had not read is reported as a gap (a jump of the job's
``seq``), nothing twice; the text is what remains. The tag stream carries no contiguous seqs
(CONTRACT.md), so its reader is held to what the contract promises: every entry once, in order,
and the job's terminal entry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.conftest import make_settings
from tests.support import JOKE, POEM, ThreadedModelServer, cut_replication, replica_of, text_of, wait_for
from tokenbus.consumer.jobs import JobView, job_result
from tokenbus.consumer.reader import Gap, stop_task
from tokenbus.consumer.subscribe import subscribe
from tokenbus.redis_server import RedisClusterProcesses, RedisServerProcess
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.worker.app import build_worker
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.job import RESOURCES
from tokenbus.worker.redis_client import streams_from_settings
from tokenbus.worker.resources import WorkerResources

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

TAG = "poem"
HOLD_AT = 3
"""Chunks of the tag the job reader passes on before its user stops asking for more (and the cut)."""
LOST_AT_LEAST = 20
"""Job-stream entries the master acknowledges after the cut before it is killed: lost for sure."""


@pytest.fixture
async def slow_model() -> AsyncIterator[ThreadedModelServer]:
    """The offline model at 50 tokens/s: joke_poem streams for about two seconds."""
    server = ThreadedModelServer(tokens_per_s=50).start()
    yield server
    await asyncio.to_thread(server.stop)


@pytest.fixture
async def failing_cluster() -> AsyncIterator[RedisClusterProcesses]:
    """A cluster of the test's own (the session's keeps its replicas), quick to fail over."""
    cluster = RedisClusterProcesses(node_timeout_ms=500)
    await asyncio.to_thread(cluster.start)
    await asyncio.to_thread(cluster.wait_synced)  # before the first sync a failover loses everything
    yield cluster
    await asyncio.to_thread(cluster.close)


async def test_a_master_killed_mid_stream_loses_only_what_readers_report(
    failing_cluster: RedisClusterProcesses, redis_server: RedisServerProcess, slow_model: ThreadedModelServer,
    prefix: str,
) -> None:  # fmt: skip
    cluster = failing_cluster
    settings = make_settings(
        redis_server.url, slow_model.base_url, prefix,
        TOKENBUS_STREAMS_URL=cluster.url, TOKENBUS_STREAMS_CLUSTER="true",
    )  # fmt: skip
    keys = settings.keys
    tag_key = keys.tag(TAG)
    master = cluster.master_of(tag_key)
    job_id = next(j for j in (f"{prefix}-{i}" for i in range(10_000)) if cluster.master_of(keys.job(j)) is master)
    job_key = keys.job(job_id)
    replica = replica_of(cluster, tag_key)
    assert replica is not None
    job_streams = [job_key, keys.tag("joke"), tag_key]
    on_master = [key for key in job_streams if cluster.master_of(key) is master]  # the job's and the tag's, at least

    streams = streams_from_settings(settings)
    worker = build_worker(settings, handle_signals=False, poll_delay_s=0.01)
    running = asyncio.create_task(worker.async_run())
    held, resume = asyncio.Event(), asyncio.Event()
    job_items: list[Entry | Gap] = []
    tag_entries: list[Entry] = []

    async def follow_job() -> None:
        chunks = 0  # of the tag: the cut falls in its part of the job
        async for item in subscribe(streams, jobs=[job_id], prefix=keys.prefix, start="0", block_ms=200):
            if isinstance(item, Entry | Gap):
                job_items.append(item)
            if isinstance(item, Entry) and item.is_chunk and TAG in item.tags:
                chunks += 1
                if chunks == HOLD_AT:  # a slow consumer: its reader reads one batch ahead, then waits
                    held.set()
                    await resume.wait()

    async def follow_tag() -> None:
        async for item in subscribe(streams, tags=[TAG], prefix=keys.prefix, start="0", block_ms=200):
            if isinstance(item, Entry) and item.job == job_id:
                tag_entries.append(item)
                if item.is_final:
                    return

    readers = [asyncio.create_task(follow_job()), asyncio.create_task(follow_tag())]
    direct = Redis.from_url(master.url, socket_timeout=10)
    try:
        async with await TokenbusClient.connect(settings) as client:
            await client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"], job_id=job_id)
        async with asyncio.timeout(60):
            await held.wait()
        resources: WorkerResources = worker.ctx[RESOURCES]

        await cut_replication(replica)  # from here on, what the master acknowledges dies with it
        cut_at = int(await direct.xlen(job_key))
        replicated = await _replica_len(replica.url, job_key)  # frozen from the cut (no link): what survives

        async def lost_enough() -> bool:
            return bool(await direct.xlen(job_key) - cut_at >= LOST_AT_LEAST)

        await wait_for(lost_enough, within=30, what=f"{LOST_AT_LEAST} entries acknowledged after the cut")
        # what it acknowledged, frozen: writes wait (unanswered, so not acknowledged) until the kill
        await direct.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
        snapshot = {key: await _read(direct, key, job_id) for key in on_master}
        acknowledged = {key: {(e.attempt, e.seq) for e in entries} for key, entries in snapshot.items()}
        await asyncio.to_thread(cluster.kill_master, master, tag_key)
        assert cluster.master_of(tag_key).port == replica.port
        resume.set()
        async with asyncio.timeout(60):
            await asyncio.gather(*readers)
        await worker.close()
        await asyncio.gather(running, return_exceptions=True)
        publisher = resources.publisher

        # what the streams hold now, and what the master had acknowledged that they lost
        final = {key: await _read(streams, key, job_id) for key in job_streams}
        kept = {key: {(e.attempt, e.seq) for e in final[key]} for key in job_streams}
        lost_acked = {key: acknowledged[key] - kept[key] for key in on_master}
        job = final[job_key]
        terminal = job[-1]
        lost = int(terminal.data.get("lost", 0))
        all_seqs = set(range(terminal.seq + 1))
        missing = all_seqs - {e.seq for e in job}
        job_lost = {seq for _, seq in lost_acked[job_key]}

        # the live reader: every seq once, as an entry or in a reported gap
        passed = [e.seq for e in job_items if isinstance(e, Entry)]
        gaps = [g for g in job_items if isinstance(g, Gap)]
        reported = [seq for g in gaps if g.missing for seq in range(g.missing[0], g.missing[1] + 1)]
        replay = await job_result(streams, job_id, prefix=keys.prefix)
        live = JobView(job_id)
        for item in job_items:
            if isinstance(item, Entry):
                live.apply(item)
        held_total = sum(len(kept[key]) for key in job_streams)
        print(
            f"failover under load: acknowledged {publisher.entries_written} (publisher), held {held_total}, "
            f"acknowledged and lost {sum(map(len, lost_acked.values()))} "
            f"({len(job_lost)} in the job stream), lost (terminal) {lost}, "
            f"reported {len(reported)} in {len(gaps)} gap(s) by the live reader and {replay.missing} on replay, "
            f"read before the loss {len(job_lost & set(passed))}; the tag reader passed on {len(tag_entries)} "
            f"entries of the job, the tag stream holds {len(kept[tag_key])}"
        )
    finally:
        resume.set()
        for task in (*readers, running):
            await stop_task(task)
        await direct.aclose()
        await streams.aclose()

    # counted: acknowledged = held + acknowledged and lost (no copy written twice, none uncounted)
    assert publisher.entries_written == held_total + sum(map(len, lost_acked.values()))
    assert job_lost and lost_acked[tag_key], "the cut did not lose what the master acknowledged"
    # lost: exactly what the master acknowledged beyond what its replica had when cut off
    assert replicated <= cut_at and job_lost == set(range(replicated, max(seq for _, seq in acknowledged[job_key]) + 1))
    # the job ends once, saying what its publisher knows it lost (the master's loss it cannot know)
    assert [e.type for e in job if e.is_terminal] == [terminal.type]
    if terminal.type is EntryType.END:
        assert lost == 0
    else:
        assert terminal.type is EntryType.ERROR and f"{lost} stream entries" in terminal.error, terminal
    assert job_lost <= missing and len(missing - job_lost) <= lost  # missing: lost by the master, or given up
    # the live reader passed on each seq once, in order; the rest it reported, once
    assert passed == sorted(set(passed)) and len(reported) == len(set(reported))
    assert set(passed).isdisjoint(reported) and set(passed) | set(reported) == all_seqs
    assert set(reported) <= missing and job_lost - set(passed) <= set(reported)
    assert job_lost - set(passed), "the reader had read every lost entry: nothing was left to report"
    assert (live.missing, live.text) == (len(reported), text_of([e for e in job_items if isinstance(e, Entry)]))
    # replayed: the text is what remains, and what is missing is counted
    assert (replay.status, replay.missing, replay.complete) == (terminal.type, len(missing), False)
    assert replay.text == text_of(job)
    if lost == 0:  # nothing given up: what remains and what the master lost make up the whole text
        assert missing == job_lost
        assert text_of(_merged(job, snapshot[job_key])) == JOKE + POEM
        assert text_of(_merged(final[tag_key], snapshot[tag_key])) == POEM
    # the tag reader: each entry once, in order, every entry the stream holds, ending with the terminal
    tag_seqs = [(e.attempt, e.seq) for e in tag_entries]
    assert tag_seqs == sorted(set(tag_seqs)) and tag_entries[-1].is_final
    assert kept[tag_key] <= set(tag_seqs) <= kept[tag_key] | acknowledged[tag_key]


async def _replica_len(url: str, key: str) -> int:
    client = Redis.from_url(url, socket_timeout=10, single_connection_client=True)  # READONLY is per connection
    try:
        await client.execute_command("READONLY")
        return int(await client.xlen(key))
    finally:
        await client.aclose()


def _merged(*streams: list[Entry]) -> list[Entry]:
    """One copy of each ``(attempt, seq)`` of ``streams``' entries, in seq order."""
    return sorted({(e.attempt, e.seq): e for stream in streams for e in stream}.values(), key=lambda e: e.seq)


async def _read(redis: Any, key: str, job_id: str) -> list[Entry]:
    """``job_id``'s entries in ``key``, copies of a retried batch dropped."""
    seen: set[tuple[int, int]] = set()
    out = []
    for entry_id, fields in await redis.xrange(key):
        entry = Entry.decode(fields, id=entry_id.decode(), stream=key)
        if entry.job == job_id and (entry.attempt, entry.seq) not in seen:
            seen.add((entry.attempt, entry.seq))
            out.append(entry)
    return out
