"""Consumer groups: a consumer dies mid-batch, its entries are claimed; a poison entry is dead-lettered."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import pytest
from redis.asyncio import Redis

from tests.conftest import STREAMS
from tests.support import Process, settings_env, wait_for, wait_until
from tokenbus.consumer.groups import GroupConsumer, group_stats
from tokenbus.redis_server import RedisServerProcess
from tokenbus.schemas.entries import Entry, TokenEntry
from tokenbus.schemas.keys import StreamKeys
from tokenbus.worker.redis_client import StreamsRedis
from tokenbus.worker.settings import Settings


async def fill(redis: StreamsRedis, key: str, n: int, job: str = "j") -> list[str]:
    ids = []
    for i in range(n):
        entry = TokenEntry(job=job, attempt=1, seq=i, ts=i, content=str(i), tags=("poem",))
        ids.append((await redis.xadd(key, entry.encode())).decode())  # type: ignore[arg-type]
    return ids


async def test_dead_consumer_entries_are_claimed_and_every_entry_acked(redis: Redis, prefix: str) -> None:
    keys = StreamKeys(prefix)
    key = keys.tag("poem")
    processed: Counter[str] = Counter()
    stuck = asyncio.Event()

    async def dies_mid_batch(entry: Entry) -> None:
        if entry.seq == 5:
            stuck.set()
            await asyncio.Event().wait()  # hangs here until its task is cancelled: a crash, mid-batch
        processed[entry.content] += 1

    async def healthy(entry: Entry) -> None:
        processed[entry.content] += 1

    first = GroupConsumer(redis, [key], "billing", "c1", keys=keys, start="0", count=10, claim_idle_ms=300)
    second = GroupConsumer(redis, [key], "billing", "c2", keys=keys, start="0", count=10, claim_idle_ms=300)
    await first.ensure_groups()
    await fill(redis, key, 30)
    doomed = asyncio.create_task(first.run(dies_mid_batch))
    await stuck.wait()
    doomed.cancel()
    await asyncio.gather(doomed, return_exceptions=True)
    pending_of_c1 = (await redis.xpending(key, "billing"))["pending"]
    assert pending_of_c1 == 5  # seq 5..9 were handed to c1 and never acked

    stop = asyncio.Event()
    survivor = asyncio.create_task(second.run(healthy, stop=stop))
    await wait_until(lambda: len(processed) == 30, within=20, what="every entry processed")
    await wait_until(lambda: second.acked + first.acked == 30, what="every entry acked")
    stop.set()
    await survivor
    assert second.claimed >= 5
    assert (await redis.xpending(key, "billing"))["pending"] == 0
    stats = await group_stats(redis, [key])
    assert [(s.group, s.pending, s.lag) for s in stats] == [("billing", 0, 0)]


async def test_a_blocked_read_outlasts_the_clients_socket_timeout(
    redis: Redis, redis_server: RedisServerProcess, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """redis-py times out a reply that takes longer than ``socket_timeout``, and ``XREADGROUP
    BLOCK`` may keep it waiting longer: the group reads on a client of its own, whose read timeout
    is above the block."""
    keys = StreamKeys(prefix)
    key = keys.tag("poem")
    client = Redis.from_url(redis_server.url, socket_timeout=0.2)
    received = asyncio.Event()

    async def handler(entry: Entry) -> None:
        received.set()

    consumer = GroupConsumer(client, [key], "g", "c1", keys=keys, block_ms=5000)
    task = asyncio.create_task(consumer.run(handler))
    try:

        async def blocked_over_a_second() -> bool:
            readers = [c for c in await redis.client_list() if c["cmd"] == "xreadgroup" and "b" in c["flags"]]
            return any(int(c["idle"]) >= 2 for c in readers)  # whole seconds: over 1 s, five socket timeouts

        await wait_for(blocked_over_a_second, what="a group read blocked for over a second")
        await fill(redis, key, 1)
        async with asyncio.timeout(10):
            await received.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()
    assert not [r for r in caplog.records if r.name == "tokenbus.consumer.groups" and r.levelno >= logging.WARNING]


async def test_poison_entry_goes_to_the_dead_letter_stream(redis: Redis, prefix: str) -> None:
    keys = StreamKeys(prefix)
    key = keys.tag("poem")
    ids = await fill(redis, key, 5)
    await redis.xadd(key, {"not": "tokenbus"})  # not an entry at all: dead-lettered at once
    seen: list[str] = []

    async def fails_on_two(entry: Entry) -> None:
        if entry.content == "2":
            raise ValueError("cannot bill this one")
        seen.append(entry.content)

    consumer = GroupConsumer(
        redis, [key], "billing", "c1", keys=keys, start="0", claim_idle_ms=50, max_deliveries=3, block_ms=50
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(fails_on_two, stop=stop))
    await wait_until(lambda: consumer.dead == 2, within=20, what="two dead letters")
    stop.set()
    await task
    assert seen == ["0", "1", "3", "4"]
    dead = await redis.xrange(keys.dead_letter)
    reasons = {fields[b"dead_id"].decode(): fields[b"dead_reason"].decode() for _, fields in dead}
    assert reasons[ids[2]] == "delivered 3 times without success"
    assert "not a tokenbus entry" in next(r for i, r in reasons.items() if i != ids[2])
    assert (await redis.xpending(key, "billing"))["pending"] == 0


@pytest.mark.parametrize("settings", STREAMS, indirect=True)
async def test_tail_with_a_group_acks_what_it_prints(streams: StreamsRedis, settings: Settings) -> None:
    key = settings.keys.tag("poem")
    await fill(streams, key, 3)
    tail = await Process.start(
        "tail", "--tag", "poem", "--group", "g", "--consumer", "c", "--from-start", "--format", "jsonl",
        env=settings_env(settings),
    )  # fmt: skip
    await tail.wait_line('"content":"2"', stream="stdout")

    async def all_acked() -> bool:
        return (
            bool((await streams.xinfo_groups(key))[0]["last-delivered-id"])
            and not (await streams.xpending(key, "g"))["pending"]
        )

    await wait_for(all_acked, what="the group to have acked everything")
    await tail.stop()
    assert len(tail.stdout) == 3
    await fill(streams, key, 2, job="later")  # two entries the group has not read yet
    groups = await Process.start("groups", "--tag", "poem", env=settings_env(settings))
    assert await groups.wait() == 0, groups.output
    assert groups.stdout[1].split()[1:5] == ["g", "1", "0", "2"]  # group, consumers, pending, lag
