"""Readers on a Redis Cluster, whose streams live on different masters: ``subscribe`` (and the
tail's way of starting from now), consumer groups with claims and dead letters, ``job_result``,
gaps, the gateway's :class:`StreamHub`, and a failover of the master holding a followed stream
while it is read. Entries are written straight into the cluster; the tag and job names are chosen
so that their slots are served by different masters (asked of the cluster, not assumed).

The single-Redis behaviour of the same readers is tested in test_subscribe.py (which runs on the
cluster too), test_groups.py and test_gateway_streams.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from tests.support import cut_replication, entry, redis_cli, replica_of, spread, token, wait_for, wait_until, write
from tests.test_subscribe import collect
from tokenbus.consumer.dead import redrive
from tokenbus.consumer.groups import GroupConsumer
from tokenbus.consumer.hub import Item, StreamHub
from tokenbus.consumer.jobs import job_result
from tokenbus.consumer.reader import Gap, latest_positions, stop_task
from tokenbus.consumer.subscribe import subscribe
from tokenbus.redis_server import RedisClusterProcesses, RedisServerProcess
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.schemas.keys import StreamKeys
from tokenbus.worker.emitter import StreamLimits
from tokenbus.worker.orphans import close_attempt


@pytest.fixture
async def cluster_client(redis_cluster: RedisClusterProcesses) -> AsyncIterator[RedisCluster]:
    client = await RedisCluster.from_url(redis_cluster.url, socket_timeout=30)
    yield client
    await client.aclose()


@pytest.fixture
def keys(prefix: str) -> StreamKeys:
    return StreamKeys(prefix)


def per_stream(items: list[Any]) -> dict[str, list[tuple[str, int]]]:
    """The (job, seq) of each entry, per stream, in the order they were passed on."""
    out: dict[str, list[tuple[str, int]]] = {}
    for item in items:
        if isinstance(item, Entry):
            out.setdefault(item.stream or "", []).append((item.job, item.seq))
    return out


async def test_subscribe_follows_tags_on_different_masters(
    redis_cluster: RedisClusterProcesses, cluster_client: RedisCluster, keys: StreamKeys
) -> None:
    tags = spread(redis_cluster, keys.tag, 3)
    streams = [keys.tag(t) for t in tags]
    assert len({redis_cluster.master_of(s).port for s in streams}) == 3
    # history: each tag's stream holds its own job's chunks, and one chunk tagged with all three
    shared = entry(EntryType.TOKEN, "all", 1, content="shared", tags=tuple(tags))
    for i, (tag, stream) in enumerate(zip(tags, streams, strict=True)):
        await write(cluster_client, stream, *[token(f"j{i}", seq, f"{tag}{seq}", tag=tag) for seq in range(1, 6)])
        await write(cluster_client, stream, shared)
    replay = await collect(subscribe(cluster_client, tags=tags, prefix=keys.prefix, start="0"), n=3 * 5 + 1)
    got = per_stream(replay)
    for i, stream in enumerate(streams):
        assert [seq for job, seq in got[stream] if job == f"j{i}"] == [1, 2, 3, 4, 5]  # all, once, in order
    assert sum(1 for item in replay if item.job == "all") == 1  # one copy of the chunk, from any node

    # as `tokenbus tail` starts: from each stream's newest entry, then live entries on every node
    positions = await latest_positions(cluster_client, streams)
    live = subscribe(cluster_client, tags=tags, prefix=keys.prefix, resume=positions, block_ms=200)
    reading = asyncio.create_task(collect(live, n=3 * 4))
    for seq in range(6, 10):
        for i, (tag, stream) in enumerate(zip(tags, streams, strict=True)):
            await write(cluster_client, stream, token(f"j{i}", seq, f"{tag}{seq}", tag=tag))
    got = per_stream(await reading)
    assert got == {stream: [(f"j{i}", seq) for seq in range(6, 10)] for i, stream in enumerate(streams)}


async def test_a_trimmed_resume_point_on_one_node_is_a_gap_for_that_stream_only(
    redis_cluster: RedisClusterProcesses, cluster_client: RedisCluster, keys: StreamKeys
) -> None:
    trimmed, kept = (keys.tag(t) for t in spread(redis_cluster, keys.tag, 2))
    trimmed_ids = await write(cluster_client, trimmed, *[token("a", i, str(i)) for i in range(6)])
    kept_ids = await write(cluster_client, kept, *[token("b", i, str(i)) for i in range(6)])
    await cluster_client.xtrim(trimmed, maxlen=2, approximate=False)
    tags = [trimmed.rpartition("{")[2][:-1], kept.rpartition("{")[2][:-1]]
    resume = {trimmed: trimmed_ids[1], kept: kept_ids[1]}
    items = await collect(subscribe(cluster_client, tags=tags, prefix=keys.prefix, resume=resume), n=1 + 2 + 4)
    gaps = [i for i in items if isinstance(i, Gap)]
    assert gaps == [Gap(trimmed, trimmed_ids[1], trimmed_ids[4])]
    assert per_stream(items) == {trimmed: [("a", 4), ("a", 5)], kept: [("b", i) for i in range(2, 6)]}


async def test_job_result_and_waiting_for_jobs_on_different_masters(
    redis_cluster: RedisClusterProcesses, cluster_client: RedisCluster, keys: StreamKeys
) -> None:
    jobs = spread(redis_cluster, keys.job, 2)
    for job in jobs:
        await write(cluster_client, keys.job(job), entry(EntryType.START, job, 0), token(job, 1, f"{job} says "))
    waiting = [asyncio.create_task(job_result(cluster_client, job, prefix=keys.prefix, wait=True)) for job in jobs]
    followed = asyncio.create_task(collect(subscribe(cluster_client, jobs=jobs, prefix=keys.prefix, start="0")))
    for job in jobs:
        await write(cluster_client, keys.job(job), token(job, 2, "hi"), entry(EntryType.END, job, 3))
    async with asyncio.timeout(15):
        views = await asyncio.gather(*waiting)
    for job, view in zip(jobs, views, strict=True):
        assert (view.text, view.status, view.complete) == (f"{job} says hi", EntryType.END, True)
        now = await job_result(cluster_client, job, prefix=keys.prefix)
        assert (now.text, now.status, now.chunks) == (view.text, view.status, 2)
    items = await followed  # ends once both jobs ended, on their two masters
    assert per_stream(items) == {keys.job(job): [(job, seq) for seq in range(4)] for job in jobs}


async def test_groups_claim_and_dead_letter_across_nodes(
    redis_cluster: RedisClusterProcesses, cluster_client: RedisCluster, keys: StreamKeys
) -> None:
    tags = spread(redis_cluster, keys.tag, 2)
    streams = [keys.tag(t) for t in tags]
    processed: Counter[tuple[str, int]] = Counter()
    stuck = asyncio.Event()

    async def dies_mid_batch(e: Entry) -> None:
        # whichever stream's read comes back first (each master answers on its own connection):
        # the consumer hangs in the middle of that batch, the other batch (if read) left unhandled
        if e.seq == 3:
            stuck.set()
            await asyncio.Event().wait()  # hangs until its task is cancelled: a crash, mid-batch
        processed[(e.job, e.seq)] += 1

    async def fails_on_poison(e: Entry) -> None:
        if e.content == "poison":
            raise ValueError("cannot handle this one")
        processed[(e.job, e.seq)] += 1

    def consumer(name: str) -> GroupConsumer:
        return GroupConsumer(
            cluster_client, streams, "g", name, keys=keys, start="0", count=10, claim_idle_ms=300,
            max_deliveries=3, block_ms=100,
        )  # fmt: skip

    first, second = consumer("c1"), consumer("c2")
    await first.ensure_groups()
    for i, (tag, stream) in enumerate(zip(tags, streams, strict=True)):
        await write(cluster_client, stream, *[token(f"j{i}", seq, str(seq), tag=tag) for seq in range(8)])
    await write(cluster_client, streams[1], token("j1", 8, "poison", tag=tags[1]))
    await cluster_client.xadd(streams[1], {"not": "tokenbus"})  # dead-lettered at once
    both = entry(EntryType.TOKEN, "both", 1, content="both", tags=tuple(tags))  # a copy on each node: handled once
    for stream in streams:
        await write(cluster_client, stream, both)

    doomed = asyncio.create_task(first.run(dies_mid_batch))
    await asyncio.wait_for(stuck.wait(), 15)
    doomed.cancel()
    await asyncio.gather(doomed, return_exceptions=True)
    assert sum([(await cluster_client.xpending(s, "g"))["pending"] for s in streams]) > 0  # c1 left entries unacked

    stop = asyncio.Event()
    survivor = asyncio.create_task(second.run(fails_on_poison, stop=stop))
    expected = {(f"j{i}", seq) for i in range(2) for seq in range(8)} | {("both", 1)}
    try:
        await wait_until(lambda: set(processed) == expected, within=20, what="every entry processed")
        await wait_until(lambda: second.dead == 2, within=20, what="two dead letters")

        async def nothing_pending() -> bool:
            return all([(await cluster_client.xpending(s, "g"))["pending"] == 0 for s in streams])

        await wait_for(nothing_pending, what="every entry acked")
    finally:
        stop.set()
        await asyncio.wait_for(survivor, 15)
    assert second.claimed >= 1
    assert processed[("both", 1)] == 1
    dead = await cluster_client.xrange(keys.dead_letter)
    reasons = sorted(fields[b"dead_reason"].decode() for _, fields in dead)
    assert reasons[0] == "delivered 3 times without success" and "not a tokenbus entry" in reasons[1]
    # handed back: appended to its stream (on its node) with redrive_group, gone from the dead letters
    [poison_id] = [i.decode() for i, f in dead if f[b"dead_reason"].startswith(b"delivered")]
    [(letter, new_id)] = (await redrive(cluster_client, keys, [poison_id])).items()
    [(_, fields)] = await cluster_client.xrange(streams[1], new_id, new_id)
    assert (letter, fields[b"redrive_group"], fields[b"content"]) == (poison_id, b"g", b"poison")
    assert len(await cluster_client.xrange(keys.dead_letter)) == 1


CLAIM_IDLE_MS = 300


async def test_a_group_claiming_what_its_own_reads_brought_meanwhile_handles_it_once(
    redis_cluster: RedisClusterProcesses, cluster_client: RedisCluster, keys: StreamKeys
) -> None:
    """On a cluster a consumer reads every master at once, in the background, while its handler
    works: an entry read from one master while the handler is busy with another's, for longer than
    ``claim_idle_ms``, is pending and idle on this very consumer when it next claims stale entries.
    Claimed, it is handled; the read that brought it must not hand it to the handler again."""
    first, second = (keys.tag(t) for t in spread(redis_cluster, keys.tag, 2))
    handled: Counter[tuple[str, int]] = Counter()
    busy = asyncio.Event()

    async def read_and_idle() -> bool:
        pending = await cluster_client.xpending_range(second, "g", min="-", max="+", count=10, idle=CLAIM_IDLE_MS)
        return bool(pending)

    async def slow(e: Entry) -> None:
        handled[(e.stream or "", e.seq)] += 1
        if e.stream == first and e.seq == 0:
            busy.set()
            await wait_for(read_and_idle, what="the other master's entry, read meanwhile, to be idle")

    consumer = GroupConsumer(
        cluster_client, [first, second], "g", "c1", keys=keys, start="0", claim_idle_ms=CLAIM_IDLE_MS, block_ms=100
    )
    await consumer.ensure_groups()
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(slow, stop=stop))
    try:
        await write(cluster_client, first, token("a", 0, "a"))
        await asyncio.wait_for(busy.wait(), 15)
        await write(cluster_client, second, token("b", 0, "b"))
        await wait_until(lambda: (second, 0) in handled, what="the entry read while the handler was busy")
        await write(cluster_client, second, token("b", 1, "after"))  # behind the entry on its read: after any copy
        await wait_until(lambda: (second, 1) in handled, what="the entry after it")
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    assert consumer.claimed >= 1  # the test's point: the entry was claimed from this consumer's own reads
    assert handled == {(first, 0): 1, (second, 0): 1, (second, 1): 1}


async def test_the_hub_follows_streams_on_different_masters(
    redis_cluster: RedisClusterProcesses, cluster_client: RedisCluster, keys: StreamKeys
) -> None:
    first, second, third = (keys.tag(t) for t in spread(redis_cluster, keys.tag, 3))
    await write(cluster_client, first, token("old", 1, "history"))
    async with StreamHub(cluster_client, block_ms=5000) as hub, hub.follow({first: "0-0", second: "$"}) as follower:
        got = await follower.next()
        assert [(i.stream, i.entry.content) for i in got if isinstance(i, Item) and i.entry] == [(first, "history")]
        await write(cluster_client, second, token("a", 1, "on the second node"))
        await write(cluster_client, first, token("a", 2, "on the first node"))
        seen = await _items_until(follower, 2)
        assert sorted(seen) == [(first, "on the first node"), (second, "on the second node")]
        # a third stream (another node) joins while the other reads are blocked: read at once
        async with hub.follow({third: "$"}) as late:
            await write(cluster_client, third, token("b", 1, "on the third node"))
            async with asyncio.timeout(3):  # far below the 5 s block: the new slot's read began at once
                assert await _items_until(late, 1) == [(third, "on the third node")]
        assert hub.streams == 2


async def _items_until(follower: Any, n: int) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    async with asyncio.timeout(15):
        while len(seen) < n:
            for item in await follower.next():
                assert isinstance(item, Item) and item.entry is not None
                seen.append((item.stream, item.entry.content))
    return seen


PAUSE_MS = 5000
"""How long one master answers nothing (``CLIENT PAUSE ... ALL``: it cannot be ended early, not even by
``CLIENT UNPAUSE``, which it holds too): long enough for the other masters' entries to be written
and read meanwhile on a busy machine (three rounds took under 3 s with two CPU hogs beside
the suite), short of any timeout (its cluster bus still answers: no failover)."""


async def test_readers_go_on_while_one_master_answers_nothing_for_a_moment(
    redis_cluster: RedisClusterProcesses, cluster_client: RedisCluster, keys: StreamKeys
) -> None:
    """``subscribe`` (what ``tokenbus tail`` runs) and the gateway's hub, each following tags on
    three masters, while one master holds every command for a moment: the others' entries are
    passed on meanwhile; once it answers again, its entries too; nothing is lost or passed twice.
    A consumer group of the three, claiming often, handles each entry once (it waits out the
    pause: its claims and acks go to every master in turn)."""
    tags = spread(redis_cluster, keys.tag, 3)
    streams = [keys.tag(t) for t in tags]
    paused, *others = streams
    for i, stream in enumerate(streams):
        await write(cluster_client, stream, *_tokens(f"j{i}", 0, 3))
    got: list[Any] = []
    reader = subscribe(cluster_client, tags=tags, prefix=keys.prefix, start="0", block_ms=200)
    hub_got: list[tuple[str, str]] = []
    handled: Counter[tuple[str, int]] = Counter()

    async def handle(e: Entry) -> None:
        handled[(e.stream or "", e.seq)] += 1

    group = GroupConsumer(
        cluster_client, streams, "g", "c1", keys=keys, start="0", claim_idle_ms=CLAIM_IDLE_MS, block_ms=200
    )
    stop = asyncio.Event()

    async def read() -> None:
        async for item in reader:
            got.append(item)

    async def follow(follower: Any) -> None:
        while True:
            hub_got.extend((i.stream, i.id) for i in await follower.next() if isinstance(i, Item))

    def seen(items: list[Any], stream: str) -> list[tuple[str, int]]:
        return per_stream(items).get(stream, [])

    direct = Redis.from_url(redis_cluster.master_of(paused).url, socket_timeout=10)
    async with StreamHub(cluster_client, block_ms=200) as hub, hub.follow(dict.fromkeys(streams, "0-0")) as follower:
        tasks = [asyncio.create_task(read()), asyncio.create_task(follow(follower))]
        consuming = asyncio.create_task(group.run(handle, stop=stop))
        try:
            await wait_until(
                lambda: len(got) == 9 and len(hub_got) == 9 and len(handled) == 9, what="the entries written before"
            )
            await direct.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")
            held = asyncio.create_task(write(cluster_client, paused, *_tokens("j0", 3, 6)))  # waits out the pause
            for first in range(3, 12, 3):  # in rounds: the group's next claim waits on the paused master meanwhile
                for i, stream in enumerate(others, start=1):
                    await write(cluster_client, stream, *_tokens(f"j{i}", first, first + 3))
                await wait_until(
                    lambda n=first + 3: all(len(seen(got, s)) == n for s in others) and len(hub_got) == 9 + 2 * (n - 3),
                    what="the other masters' entries, read while one master is paused",
                )
            assert not held.done(), f"the pause ({PAUSE_MS} ms) ended before the other masters' entries were read"
            assert len(seen(got, paused)) == 3
            await asyncio.wait_for(held, PAUSE_MS / 1000 + 20)
            for i, stream in enumerate(streams):
                await write(cluster_client, stream, *_tokens(f"j{i}", 12, 15))
            await wait_until(
                lambda: len(got) == len(hub_got) == len(handled) == 39, what="every entry, after the pause"
            )
            stop.set()
            await asyncio.wait_for(consuming, 15)
        finally:
            stop.set()
            for task in (*tasks, consuming):
                await stop_task(task)
            await reader.aclose()
            await direct.aclose()
    seqs = {paused: [*range(6), *range(12, 15)], **{stream: list(range(15)) for stream in others}}
    assert per_stream(got) == {stream: [(f"j{i}", seq) for seq in seqs[stream]] for i, stream in enumerate(streams)}
    held_ids = {s: [i.decode() for i, _ in await cluster_client.xrange(s)] for s in streams}
    assert sorted(hub_got) == sorted((s, i) for s, ids in held_ids.items() for i in ids)
    assert not [item for item in got if not isinstance(item, Entry)]  # no gap: nothing was trimmed or lost
    assert handled == {(stream, seq): 1 for stream in streams for seq in seqs[stream]}


async def test_the_sweepers_close_reaches_streams_on_every_master(
    redis_cluster: RedisClusterProcesses, cluster_client: RedisCluster, keys: StreamKeys
) -> None:
    """A killed worker's attempt is closed in its job stream and in every tag stream it wrote to,
    wherever their slots are served (no transaction can span them on a cluster)."""
    [job] = spread(redis_cluster, keys.job, 1)
    tags = spread(redis_cluster, keys.tag, 2)
    await write(cluster_client, keys.job(job), entry(EntryType.START, job, 0))
    for seq, tag in enumerate(tags, start=1):
        await write(cluster_client, keys.job(job), token(job, seq, tag, tag=tag))
        await write(cluster_client, keys.tag(tag), token(job, seq, tag, tag=tag))
    closed = await close_attempt(cluster_client, keys, StreamLimits(), job, retry=False, reason="gone")
    assert closed is not None and closed.seq == 3
    for key in (keys.job(job), *(keys.tag(t) for t in tags)):
        [(_, fields)] = await cluster_client.xrevrange(key, count=1)
        assert Entry.decode(fields).type is EntryType.ERROR, key
    view = await job_result(cluster_client, job, prefix=keys.prefix)
    assert (view.status, view.text, view.complete) == (EntryType.ERROR, "".join(tags), True)
    assert await close_attempt(cluster_client, keys, StreamLimits(), job, retry=False, reason="again") is None


async def test_a_reader_follows_a_stream_whose_slot_migrates_to_another_master(
    redis_cluster: RedisClusterProcesses, cluster_client: RedisCluster, keys: StreamKeys
) -> None:
    """``CLUSTER SETSLOT … MIGRATING/IMPORTING``, ``MIGRATE`` and ``SETSLOT … NODE`` while entries
    are written before, during and after: the reader (answered ``ASK``, then ``MOVED``) reads on
    from the last id it saw, and passes every entry on once, in order."""
    [tag] = spread(redis_cluster, keys.tag, 1)
    key = keys.tag(tag)
    source = redis_cluster.master_of(key)
    target = next(n for n in redis_cluster.nodes if n.running and n is not source and _is_master(n))
    live = [n for n in redis_cluster.nodes if n.running]
    clients = {n.port: Redis(host="127.0.0.1", port=n.port, socket_timeout=10) for n in live}
    items = subscribe(cluster_client, tags=[tag], prefix=keys.prefix, start="0", block_ms=200)
    reading = asyncio.create_task(collect(items, n=12, within=30))
    try:
        slot = int(await clients[source.port].execute_command("CLUSTER", "KEYSLOT", key))
        source_id, target_id = (
            redis_cli(source, "CLUSTER", "MYID").strip(),
            redis_cli(target, "CLUSTER", "MYID").strip(),
        )
        await write(cluster_client, key, *_tokens("j", 0, 3))
        await clients[target.port].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        await clients[source.port].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        await write(cluster_client, key, *_tokens("j", 3, 6))  # still on the source
        await clients[source.port].execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", key)
        await write(cluster_client, key, *_tokens("j", 6, 9))  # ASK: on the target
        for node in live:
            if _is_master(node):
                await clients[node.port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        await write(cluster_client, key, *_tokens("j", 9, 12))  # the slot is the target's
        got = await reading
    finally:
        await stop_task(reading)
        for client in clients.values():
            await client.aclose()
    assert redis_cluster.master_of(key).port == target.port
    assert [(i.job, i.seq) for i in got] == [("j", seq) for seq in range(12)]


def _is_master(node: RedisServerProcess) -> bool:
    return "role:master" in redis_cli(node, "INFO", "replication")


LOST = 3000
"""Entries written while the replica is stopped: more than the reader's batch and its read-ahead
(1024 each), so some are lost before the reader could have read them."""


async def test_a_failover_mid_read_repeats_nothing_and_reads_on_from_the_last_id(
    redis_cluster: RedisClusterProcesses, cluster_client: RedisCluster, keys: StreamKeys
) -> None:
    """The master serving a followed job stream is killed while the reader follows it and another
    job on another master. Its replication is cut first, so the entries written to the master
    meanwhile are acknowledged and then lost for sure. The reader goes on from the last id
    it had seen, on the new master: it passes nothing on twice and every entry the cluster holds
    once, in order; the lost entries it had not read are reported as a gap (the job's ``seq`` jumps)."""
    victim = next(n for n in (f"v{i}" for i in range(1000)) if replica_of(redis_cluster, keys.job(n)))
    victim_key = keys.job(victim)
    [calm] = spread(redis_cluster, keys.job, 1, taken=(victim_key,))
    calm_key = keys.job(calm)
    master = redis_cluster.master_of(victim_key)
    replica = replica_of(redis_cluster, victim_key)
    assert replica is not None

    received: list[Entry] = []
    others: list[Any] = []
    pulled = asyncio.Event()  # cleared: the reader's user stops asking for more (a slow consumer)
    pulled.set()
    reader = subscribe(cluster_client, jobs=[victim, calm], prefix=keys.prefix, start="0", block_ms=200)

    async def consume() -> None:
        async for item in reader:
            (received if isinstance(item, Entry) else others).append(item)
            await pulled.wait()

    task = asyncio.create_task(consume())
    after = 10 + LOST
    try:
        await write(cluster_client, victim_key, entry(EntryType.START, victim, 0), *_tokens(victim, 1, 10))
        await write(cluster_client, calm_key, entry(EntryType.START, calm, 0), *_tokens(calm, 1, 5))
        await wait_until(lambda: len(received) == 15, what="the first entries")
        await _replicated(replica, victim_key, 10)

        pulled.clear()
        await cut_replication(replica)  # what follows is acknowledged, never replicated: lost with the master
        async with cluster_client.pipeline() as pipe:
            for e in _tokens(victim, 10, after):
                pipe.xadd(victim_key, e.encode())  # type: ignore[arg-type]
            assert len(await pipe.execute()) == LOST  # acknowledged by the master
        master.stop(kill=True)
        await asyncio.to_thread(_wait_served_by, redis_cluster, victim_key, replica)
        held = [e.seq for e in await _read_job(cluster_client, victim_key)]
        assert held == list(range(len(held))) and 10 <= len(held) < after  # the newest acknowledged were lost

        pulled.set()
        end = entry(EntryType.END, victim, after + 3)
        await write(cluster_client, victim_key, *_tokens(victim, after, after + 3), end)
        await write(cluster_client, calm_key, entry(EntryType.END, calm, 5))
        async with asyncio.timeout(30):
            await task  # both jobs ended: the reader read on, on the new master and on the other one
    finally:
        await stop_task(task)
        await reader.aclose()

    seqs = [e.seq for e in received if e.job == victim]
    assert seqs == sorted(set(seqs))  # in order, nothing twice
    assert set(held) | set(range(after, after + 4)) <= set(seqs)  # every entry the cluster holds
    # what it passed on of the lost ones it had read before the master died (at most a batch and
    # the one read ahead); the rest were lost unread: the job's seq jumps over them
    last_before = max(s for s in seqs if s < after)
    assert last_before < after - 1 and set(range(last_before + 1, after)).isdisjoint(seqs)
    assert seqs == [*range(last_before + 1), *range(after, after + 4)]
    assert [e.seq for e in received if e.job == calm] == list(range(6))  # the other master's slot read on
    # and the reader says so: one gap, naming the job, its attempt and the seqs lost unread
    assert [(g.stream, g.job, g.attempt, g.missing) for g in others] == [
        (victim_key, victim, 1, (last_before + 1, after - 1))
    ]


def _tokens(job: str, first: int, end: int) -> list[Entry]:
    return [token(job, seq, str(seq)) for seq in range(first, end)]


async def _replicated(replica: RedisServerProcess, key: str, n: int) -> None:
    client = Redis(host="127.0.0.1", port=replica.port, socket_timeout=10)
    try:
        await client.execute_command("READONLY")

        async def has_them() -> bool:
            return int(await client.xlen(key)) == n

        await wait_for(has_them, what=f"the replica on port {replica.port} to hold {key}")
    finally:
        await client.aclose()


def _wait_served_by(cluster: RedisClusterProcesses, key: str, node: RedisServerProcess, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(LookupError):  # between the master's loss and the replica's promotion
            if cluster.master_of(key).port == node.port:
                break
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {node.port} did not take over {key} within {timeout_s}s")
        time.sleep(0.05)
    cluster.wait_ready(timeout_s)


async def _read_job(client: RedisCluster, key: str) -> list[Entry]:
    return [Entry.decode(f, id=i.decode(), stream=key) for i, f in await client.xrange(key)]
