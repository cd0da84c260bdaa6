"""The publisher on a Redis Cluster (3 masters, 3 replicas): entries routed by hash slot to every
master, in order per stream; slots moved under it (``ASK`` during a migration, ``MOVED`` after);
a master hung mid-batch and killed (failover): nothing acknowledged lost, what is given up counted;
chunks merged while a master holds the publisher up (``TOKENBUS_COALESCE``) routed to every stream's
master; ``TOKENBUS_WAIT_REPLICAS`` accepted (its jobs: test_loss.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis, RedisCluster

from tests.conftest import make_settings
from tests.support import emit_while_paused, read_stream, text_of, wait_until
from tokenbus.redis_server import RedisClusterProcesses
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.schemas.keys import StreamKeys
from tokenbus.worker.emitter import JobEmitter, Outcome, StreamLimits
from tokenbus.worker.publisher import Publisher

LIMITS = StreamLimits()


@pytest.fixture
async def cluster_client(redis_cluster: RedisClusterProcesses) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(redis_cluster.url, socket_timeout=30)
    await client.initialize()
    yield client
    await client.aclose()


def spread(client: RedisCluster, key_of: Callable[[str], str], count: int) -> list[str]:
    """``count`` names whose keys (``key_of(name)``) live on ``count`` different masters."""
    names: dict[str, str] = {}
    for i in range(10_000):
        name = f"n{uuid.uuid4().hex[:8]}{i}"
        names.setdefault(client.get_node_from_key(key_of(name)).name, name)
        if len(names) == count:
            return list(names.values())
    raise AssertionError(f"no {count} masters")


def emit(emitter: JobEmitter, count: int, tags: list[str]) -> None:
    for i in range(count):
        emitter.custom({"content": f"{emitter.seq}.", "tags": tags, "i": i})


def chunks(entries: list[Entry], job: str) -> list[int]:
    """The seqs of ``job``'s chunk entries, in stream order, copies of a retried batch dropped."""
    seen: set[int] = set()
    out = []
    for entry in entries:
        if entry.job == job and entry.is_chunk and entry.seq not in seen:
            seen.add(entry.seq)
            out.append(entry.seq)
    return out


async def test_entries_of_jobs_and_tags_on_every_master_land_in_their_streams_in_order(
    cluster_client: RedisCluster,
) -> None:
    keys = StreamKeys(f"t{uuid.uuid4().hex[:10]}")
    jobs = spread(cluster_client, keys.job, 3)
    tags = spread(cluster_client, keys.tag, 3)
    publisher = Publisher(cluster_client, batch_max=64).start()  # many batches, each to every master
    emitters = [JobEmitter(publisher, keys, LIMITS, job, 1) for job in jobs]
    for emitter in emitters:
        emitter.start({"graph": "test"})
    for _ in range(20):  # the jobs' chunks interleaved in every batch
        for emitter in emitters:
            emit(emitter, 10, tags)
            await asyncio.sleep(0)
    for emitter in emitters:
        emitter.finish(Outcome())
        await emitter.sink.flushed()
        assert not emitter.sink.lost and not emitter.sink.refused
    await publisher.close()

    for emitter in emitters:
        job = await read_stream(cluster_client, keys.job(emitter.job_id))  # type: ignore[arg-type]
        assert [e.seq for e in job] == list(range(202))
        assert job[0].type is EntryType.START and job[-1].type is EntryType.END
        assert 0 < await cluster_client.ttl(keys.job(emitter.job_id)) <= LIMITS.job_ttl_s
    for tag in tags:
        stream = await read_stream(cluster_client, keys.tag(tag))  # type: ignore[arg-type]
        assert len(stream) == 3 * 201  # every job's chunks and terminal entry, once
        for job in jobs:
            assert chunks(stream, job) == list(range(1, 201))
    nodes = {cluster_client.get_node_from_key(keys.tag(tag)).name for tag in tags}
    assert len(nodes) == 3 and publisher.entries_written == 3 * (202 + 3 * 201)


async def migrate_while_publishing(
    redis_cluster: RedisClusterProcesses, publisher: Publisher, emitter: JobEmitter, tag_key: str, tag: str
) -> None:
    """Move the slot of ``tag_key`` to another master while ``emitter`` writes to it: the slot
    marked migrating, its keys moved (``ASK`` from then on), then given to the new master
    (``MOVED``). Chunks are queued all along; each phase ends with a flush."""
    target = redis_cluster.other_master(tag_key)
    emit(emitter, 50, [tag])
    await emitter.sink.flushed()
    redirects = publisher.redirects

    slot, source = redis_cluster.begin_migration(tag_key, target)
    producing = asyncio.create_task(asyncio.to_thread(redis_cluster.migrate_keys, slot, source, target))
    while not producing.done():  # batches in flight as the keys move
        emit(emitter, 5, [tag])
        await asyncio.sleep(0)
    assert await producing >= 1
    emit(emitter, 50, [tag])  # the source has no such key now: ASK, to the target
    await emitter.sink.flushed()
    assert publisher.redirects > redirects, "no ASK was followed"
    redirects, reloads = publisher.redirects, publisher.slot_table_reloads

    await asyncio.to_thread(redis_cluster.end_migration, slot, target)
    emit(emitter, 50, [tag])  # the slot table still says source: MOVED
    await emitter.sink.flushed()
    assert publisher.redirects > redirects, "no MOVED was followed"
    assert publisher.slot_table_reloads > reloads, "MOVED did not reload the slot table"
    assert redis_cluster.master_of(tag_key) is target


async def test_a_slot_migrated_while_a_job_streams_to_it_loses_nothing_and_keeps_the_order(
    redis_cluster: RedisClusterProcesses, cluster_client: RedisCluster
) -> None:
    keys = StreamKeys(f"t{uuid.uuid4().hex[:10]}")
    tag, job_id = f"m{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    publisher = Publisher(cluster_client, batch_max=32).start()
    emitter = JobEmitter(publisher, keys, LIMITS, job_id, 1)
    emitter.start({"graph": "test"})

    await migrate_while_publishing(redis_cluster, publisher, emitter, keys.tag(tag), tag)
    emitter.finish(Outcome())
    await emitter.sink.flushed()
    await publisher.close()

    assert not emitter.sink.lost and not emitter.sink.refused
    tag_stream = await read_stream(cluster_client, keys.tag(tag))  # type: ignore[arg-type]
    job = await read_stream(cluster_client, keys.job(job_id))  # type: ignore[arg-type]
    assert chunks(tag_stream, job_id) == list(range(1, emitter.seq - 1))
    assert [e.seq for e in job] == list(range(emitter.seq))  # the job stream's slot did not move: no copies
    assert tag_stream[-1].type is EntryType.END and job[-1].type is EntryType.END


async def test_a_master_hung_mid_batch_then_killed_loses_nothing_it_acknowledged() -> None:
    """A master stops answering (SIGSTOP) with a batch of two publishers in flight, and is killed;
    its replica takes over. The publisher that may retry for long writes everything there; the
    one that gives up at once counts as lost exactly the commands that master never took, and
    nothing of what the healthy masters took. (A private cluster: the shard is left without a
    replica.)"""
    cluster = RedisClusterProcesses()
    await asyncio.to_thread(cluster.start)
    await asyncio.to_thread(cluster.wait_synced)  # before the first sync a failover loses everything
    client = RedisCluster.from_url(cluster.url, socket_timeout=30)
    try:
        await client.initialize()
        keys = StreamKeys(f"t{uuid.uuid4().hex[:10]}")
        tags = spread(client, keys.tag, 3)  # one on each master
        # The doomed master is the client's default node (slot 0's): the one redis-py's own
        # initialize() asks for its command table, the worst case for reloading the slot table.
        default = client.get_default_node().name
        doomed = next(tag for tag in tags if client.get_node_from_key(keys.tag(tag)).name == default)
        healthy = next(tag for tag in tags if tag != doomed)
        master = cluster.master_of(keys.tag(doomed))
        job_ids = [j for j in spread(client, keys.job, 3) if client.get_node_from_key(keys.job(j)).port != master.port][
            :2
        ]  # the job streams live on healthy masters
        patient = Publisher(client, give_up_s=120).start()
        hasty = Publisher(client, give_up_s=0.1).start()
        emitters = [JobEmitter(p, keys, LIMITS, j, 1) for p, j in zip((patient, hasty), job_ids, strict=True)]
        for emitter in emitters:
            emitter.start({"graph": "test"})
            emit(emitter, 100, [doomed, healthy])
            await emitter.sink.flushed()
        await asyncio.to_thread(cluster.wait_replicated, master)  # what it acknowledged, its replica has

        master.pause()
        name = f"127.0.0.1:{master.port}"
        for emitter in emitters:
            emit(emitter, 100, [doomed, healthy])
        await wait_until(lambda: all(name in p.nodes_in_flight for p in (patient, hasty)), what="batches in flight")
        await asyncio.to_thread(cluster.kill_master, master, keys.tag(doomed))
        for emitter in emitters:
            emitter.finish(Outcome())
            await emitter.sink.flushed()
        await patient.close()
        await hasty.close()

        patient_sink, hasty_sink = emitters[0].sink, emitters[1].sink
        assert patient_sink.lost == 0 and not patient_sink.refused
        assert patient.retries > 0
        assert hasty_sink.lost > 0 and hasty.entries_lost == hasty_sink.lost
        assert "could not be written" in str(hasty_sink.failure())

        doomed_stream = await read_stream(client, keys.tag(doomed))  # type: ignore[arg-type]
        healthy_stream = await read_stream(client, keys.tag(healthy))  # type: ignore[arg-type]
        patient_job, hasty_job = emitters[0].job_id, emitters[1].job_id
        assert chunks(doomed_stream, patient_job) == list(range(1, 201))  # nothing lost, in order
        assert chunks(healthy_stream, patient_job) == list(range(1, 201))
        assert chunks(healthy_stream, hasty_job) == list(range(1, 201))  # the healthy master's copies all there
        for emitter in emitters:  # the job streams (healthy masters) hold every entry
            job = await read_stream(client, keys.job(emitter.job_id))  # type: ignore[arg-type]
            assert chunks(job, emitter.job_id) == list(range(1, 201))
        hasty_doomed = chunks(doomed_stream, hasty_job)
        assert hasty_doomed[:100] == list(range(1, 101))  # acknowledged before the hang: replicated, kept
        written = len(hasty_doomed) + sum(e.job == hasty_job and e.is_terminal for e in doomed_stream)
        assert written + hasty_sink.lost == 201  # every copy for the doomed tag: written, or counted lost
        print(
            f"hung master: {patient.retries} retries by the patient publisher; the hasty one wrote {written} "
            f"of 201 copies to the doomed tag and counted {hasty_sink.lost} lost"
        )
    finally:
        await client.aclose()
        await asyncio.to_thread(cluster.close)


async def test_chunks_merged_while_the_jobs_master_holds_the_publisher_up_reach_every_stream_exactly(
    redis_cluster: RedisClusterProcesses, cluster_client: RedisCluster
) -> None:
    """The job's master pauses writes (``CLIENT PAUSE WRITE``) with the start entry in flight: the
    chunks queued meanwhile merge into one entry, replaced in the buffer, whose copies go to three
    masters (cut by the template's route): each lands in its stream, with the same text and ``n``."""
    keys = StreamKeys(f"t{uuid.uuid4().hex[:10]}")
    (job_id,) = spread(cluster_client, keys.job, 1)
    tags = spread(cluster_client, keys.tag, 3)  # one on each master, so one on the job's
    call = {"langgraph_node": "write", "tags": tags, "ls_model_name": "m"}
    words = [f"w{i} é " for i in range(40)]
    publisher = Publisher(cluster_client, coalesce_after=1).start()
    master = Redis.from_url(redis_cluster.master_of(keys.job(job_id)).url, socket_timeout=30)
    try:
        emitter = JobEmitter(publisher, keys, LIMITS, job_id, 1)
        merged_while_paused = await emit_while_paused(publisher, emitter, master, words, call)
    finally:
        await master.aclose()
        await publisher.close()

    text = "".join(words)
    job = await read_stream(cluster_client, keys.job(job_id))  # type: ignore[arg-type]
    assert merged_while_paused == len(words) - 2  # the first chunk went alone (nothing waited yet)
    assert [e.n for e in job] == [1, 1, len(words) - 1, 1] and job[-1].seq == len(words) + 1
    assert text_of(job) == text and job[-1].data == {"chunks": len(words)}
    for tag in tags:  # every master holds its tag's copy of the merged entry
        stream = await read_stream(cluster_client, keys.tag(tag))  # type: ignore[arg-type]
        assert [(e.job, e.seq, e.n, e.content, e.tags) for e in stream] == [
            (e.job, e.seq, e.n, e.content, e.tags) for e in job[1:]
        ]
    nodes = {cluster_client.get_node_from_key(keys.tag(tag)).name for tag in tags}
    assert len(nodes) == 3 and cluster_client.get_node_from_key(keys.job(job_id)).name in nodes
    assert publisher.redirects == 0  # each copy went straight to its stream's master
    assert publisher.entries_written == len(job) + 3 * (len(job) - 1) and not emitter.sink.lost


async def test_wait_replicas_is_accepted_on_a_cluster(cluster_client: RedisCluster) -> None:
    """Each master's pipeline waits for that master's replicas (test_loss.py runs jobs so)."""
    queue, model = "redis://127.0.0.1:6379/0", "http://127.0.0.1:1"
    cluster = {"TOKENBUS_STREAMS_URL": "redis://127.0.0.1:7000/0", "TOKENBUS_STREAMS_CLUSTER": "true"}
    settings = make_settings(queue, model, "p", TOKENBUS_WAIT_REPLICAS="2", TOKENBUS_WAIT_TIMEOUT_MS="300", **cluster)
    assert (settings.streams_cluster, settings.wait_replicas, settings.wait_timeout_ms) == (True, 2, 300)
    assert make_settings(queue, model, "p", **cluster).wait_replicas == 0
    publisher = Publisher(cluster_client, wait_replicas=2, wait_timeout_ms=300)
    assert (publisher.wait_replicas, publisher.wait_timeout_ms) == (2, 300)
