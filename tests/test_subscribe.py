"""The consumer API: filtering, attempts, duplicates, resuming, gaps, reconnects.

Runs against fakeredis (fast), the private redis-server and the private Redis Cluster (whose
reader reads each hash slot on its own connection to the node serving it): one suite, three backends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from tests.support import entry, token, wait_until, write
from tokenbus.consumer._redis_cluster import AnyRedis
from tokenbus.consumer.attempts import Restart
from tokenbus.consumer.reader import Gap, StreamReader, latest_positions
from tokenbus.consumer.subscribe import subscribe
from tokenbus.redis_server import RedisClusterProcesses, RedisServerProcess
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.schemas.errors import MalformedEntry
from tokenbus.schemas.keys import StreamKeys


@pytest.fixture(params=["fakeredis", "redis-server", "redis-cluster"])
async def any_redis(request: pytest.FixtureRequest) -> AsyncIterator[AnyRedis]:
    client: AnyRedis
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis()
    else:
        client = await real_client(request, request.param)
    yield client
    await client.aclose()


@pytest.fixture(params=["redis-server", "redis-cluster"])
async def real_redis(request: pytest.FixtureRequest) -> AsyncIterator[AnyRedis]:
    """A real Redis, or a real Redis Cluster (fakeredis does not track trimming)."""
    client = await real_client(request, request.param)
    yield client
    await client.aclose()


async def real_client(request: pytest.FixtureRequest, kind: str) -> AnyRedis:
    if kind == "redis-cluster":
        cluster: RedisClusterProcesses = request.getfixturevalue("redis_cluster")
        return await RedisCluster.from_url(cluster.url, socket_timeout=30)
    server: RedisServerProcess = request.getfixturevalue("redis_server")
    return Redis.from_url(server.url, socket_timeout=30)


async def collect(
    stream: AsyncIterator[Entry | Gap | Restart], n: int | None = None, within: float = 10.0
) -> list[Any]:
    items: list[Any] = []
    async with asyncio.timeout(within):
        async for item in stream:
            items.append(item)
            if n is not None and len(items) == n:
                break
    return items


@pytest.fixture
def keys(prefix: str) -> StreamKeys:
    return StreamKeys(prefix)


async def test_follow_job_until_final(any_redis: Redis, keys: StreamKeys) -> None:
    await write(
        any_redis, keys.job("j"),
        entry(EntryType.START, "j", 0), token("j", 1, "In"), token("j", 2, " sun"),
        entry(EntryType.END, "j", 3),
    )  # fmt: skip
    items = await collect(subscribe(any_redis, jobs=["j"], prefix=keys.prefix, start="0"))
    assert [i.type for i in items] == ["start", "token", "token", "end"]
    assert [i.stream for i in items] == [keys.job("j")] * 4


async def test_tag_stream_with_filters(any_redis: Redis, keys: StreamKeys) -> None:
    poem = keys.tag("poem")
    await write(
        any_redis, poem,
        token("a", 1, "x", node="n1"), token("b", 1, "y", node="n2"), token("a", 2, "z", node="n2"),
        entry(EntryType.END, "a", 3), entry(EntryType.END, "b", 2),
    )  # fmt: skip
    got = await collect(subscribe(any_redis, tags=["poem"], jobs=["a"], prefix=keys.prefix, start="0"))
    assert [(i.job, i.type) for i in got] == [("a", "token"), ("a", "token"), ("a", "end")]
    got = await collect(
        subscribe(any_redis, tags=["poem"], nodes=["n2"], types=["token"], prefix=keys.prefix, start="0"), n=2
    )
    assert [i.content for i in got] == ["y", "z"]


async def test_superseded_attempts_and_duplicates_are_hidden(any_redis: Redis, keys: StreamKeys) -> None:
    """A replay passes on the newest attempt only; a live reader is told when a new one begins."""
    job = keys.job("j")
    first_attempt = [entry(EntryType.START, "j", 0), token("j", 1, "A"), token("j", 1, "A")]  # a retried batch
    second_attempt = [
        entry(EntryType.ERROR, "j", 2, retry=True),  # attempt 2 closes attempt 1 first
        entry(EntryType.START, "j", 0, attempt=2), token("j", 1, "B", attempt=2),
        token("j", 2, "stale", attempt=1),  # the killed attempt's last pipeline landing late
        token("j", 2, "C", attempt=2), entry(EntryType.END, "j", 3, attempt=2),
    ]  # fmt: skip
    await write(any_redis, job, *first_attempt)
    live = subscribe(any_redis, jobs=["j"], prefix=keys.prefix, start="0", block_ms=100)
    seen = await collect(live, n=2)
    await write(any_redis, job, *second_attempt)
    seen += await collect(live)
    assert [(i.type, i.attempt, getattr(i, "content", "")) for i in seen] == [
        ("start", 1, ""), ("token", 1, "A"), ("error", 1, ""),
        ("restart", 2, ""), ("start", 2, ""), ("token", 2, "B"), ("token", 2, "C"), ("end", 2, ""),
    ]  # fmt: skip
    assert seen[3] == Restart("j", 2, 1)
    replay = await collect(subscribe(any_redis, jobs=["j"], prefix=keys.prefix, start="0"))
    assert [(i.type, i.attempt, i.content) for i in replay] == [
        ("start", 2, ""), ("token", 2, "B"), ("token", 2, "C"), ("end", 2, ""),
    ]  # fmt: skip


async def test_a_retry_terminal_does_not_end_the_follow(any_redis: Redis, keys: StreamKeys) -> None:
    await write(
        any_redis, keys.job("j"), entry(EntryType.START, "j", 0), entry(EntryType.CANCELLED, "j", 1, retry=True)
    )
    follow = subscribe(any_redis, jobs=["j"], prefix=keys.prefix, start="0", block_ms=100)
    items = await collect(follow, n=2)
    await write(
        any_redis, keys.job("j"), entry(EntryType.START, "j", 0, attempt=2), entry(EntryType.END, "j", 1, attempt=2)
    )
    items += await collect(follow)
    assert [(i.attempt, i.type) for i in items] == [
        (1, "start"),
        (1, "cancelled"),
        (2, "restart"),
        (2, "start"),
        (2, "end"),
    ]


async def test_chunk_with_two_followed_tags_is_seen_once(any_redis: Redis, keys: StreamKeys) -> None:
    both = entry(EntryType.TOKEN, "j", 1, content="both", tags=("joke", "poem"))
    end = entry(EntryType.END, "j", 2)
    await write(any_redis, keys.tag("joke"), both, end)
    await write(any_redis, keys.tag("poem"), both, end)
    items = await collect(subscribe(any_redis, tags=["poem", "joke"], jobs=["j"], prefix=keys.prefix, start="0"))
    assert [(i.type, i.content) for i in items] == [("token", "both"), ("end", "")]


async def test_a_jobs_end_in_one_tag_stream_waits_for_its_chunks_in_another(
    any_redis: AnyRedis, keys: StreamKeys
) -> None:
    """Each stream is read in its own order (on a cluster, each slot on its own connection): the
    job's final entry read from one stream ends the follow only once the other stream that
    carried the job has shown it too."""
    end = entry(EntryType.END, "j", 4)
    await write(any_redis, keys.tag("joke"), token("j", 1, "a", tag="joke"), end)
    await write(any_redis, keys.tag("poem"), token("j", 2, "b"))
    follow = subscribe(any_redis, tags=["joke", "poem"], jobs=["j"], prefix=keys.prefix, start="0", block_ms=100)
    items = await collect(follow, n=3)
    assert sorted((i.seq, i.type) for i in items) == [(1, "token"), (2, "token"), (4, "end")]
    await write(any_redis, keys.tag("poem"), token("j", 3, "c"), end)  # the poem stream's last chunk, then its end
    items = await collect(follow)  # until the follow ends by itself
    assert [(i.seq, i.content) for i in items] == [(3, "c")]


async def test_live_entries_after_subscribing(any_redis: Redis, keys: StreamKeys) -> None:
    await write(any_redis, keys.tag("poem"), token("old", 1, "before"))
    positions = await latest_positions(any_redis, [keys.tag("poem")])
    stream = subscribe(any_redis, tags=["poem"], prefix=keys.prefix, resume=positions, block_ms=100)
    await write(any_redis, keys.tag("poem"), token("new", 1, "after"))
    items = await collect(stream, n=1)
    assert items[0].content == "after"


async def test_non_tokenbus_entries_are_skipped_or_raised(any_redis: Redis, keys: StreamKeys) -> None:
    key = keys.tag("poem")
    await any_redis.xadd(key, {"hello": "world"})
    await any_redis.xadd(key, {"v": "9", "type": "token"})
    await write(any_redis, key, token("j", 1, "ok"))
    items = await collect(subscribe(any_redis, tags=["poem"], prefix=keys.prefix, start="0"), n=1)
    assert items[0].content == "ok"
    with pytest.raises(MalformedEntry, match="no 'v' field"):
        await collect(subscribe(any_redis, tags=["poem"], prefix=keys.prefix, start="0", on_malformed="raise"))


async def test_resume_point_that_was_trimmed_is_a_gap(real_redis: AnyRedis, keys: StreamKeys) -> None:
    """Real Redis only: fakeredis does not track ``max-deleted-entry-id``."""
    any_redis = real_redis
    key = keys.tag("poem")
    ids = await write(any_redis, key, *[token("j", i, str(i)) for i in range(10)])
    await any_redis.xtrim(key, maxlen=3, approximate=False)
    items = await collect(subscribe(any_redis, tags=["poem"], prefix=keys.prefix, resume={key: ids[2]}), n=4)
    assert isinstance(items[0], Gap) and items[0].after == ids[2] and items[0].first_available == ids[7]
    assert [i.content for i in items[1:]] == ["7", "8", "9"]
    # resuming from an id that is still held is no gap
    items = await collect(subscribe(any_redis, tags=["poem"], prefix=keys.prefix, resume={key: ids[8]}), n=1)
    assert items[0].content == "9"


async def test_reader_resumes_after_its_connection_is_killed(
    redis_server: RedisServerProcess, keys: StreamKeys
) -> None:
    admin = Redis.from_url(redis_server.url)
    reader = Redis.from_url(redis_server.url, client_name=f"{keys.prefix}-reader", socket_timeout=5)
    try:
        key = keys.tag("poem")
        received: list[str] = []

        async def consume() -> None:
            async for item in subscribe(reader, tags=["poem"], prefix=keys.prefix, start="0", block_ms=200):
                assert isinstance(item, Entry)
                received.append(item.content)
                if len(received) == 20:
                    return

        task = asyncio.create_task(consume())
        await write(admin, key, *[token("j", i, str(i)) for i in range(10)])
        await wait_until(lambda: len(received) == 10, what="first ten entries")
        clients = await admin.client_list()
        victim = next(c for c in clients if c.get("name") == f"{keys.prefix}-reader")
        assert await admin.client_kill_filter(_id=victim["id"]) == 1
        await write(admin, key, *[token("j", i, str(i)) for i in range(10, 20)])
        async with asyncio.timeout(15):
            await task
        assert received == [str(i) for i in range(20)]
    finally:
        await reader.aclose()
        await admin.aclose()


async def test_a_lagging_reader_is_told_when_it_falls_past_the_cap(real_redis: AnyRedis, keys: StreamKeys) -> None:
    """Real Redis: after a full batch, the next read checks in the same pipeline whether the
    reader's position was trimmed. The reader reads one batch ahead: entries 3..5 were read
    (with the first batch handed out), entries 6 and 7 are trimmed before anyone reads them."""
    key = keys.tag("poem")
    ids = await write(real_redis, key, *[token("j", i, str(i)) for i in range(10)])
    reader = StreamReader(real_redis, {key: "0-0"}, count=3, block_ms=100).batches()
    try:
        first = await anext(reader)
        assert [i for _, i, _ in first] == ids[:3]
        await real_redis.xtrim(key, maxlen=2, approximate=False)
        read_ahead = await anext(reader)
        assert [i for _, i, _ in read_ahead] == ids[3:6]
        gap = await anext(reader)
        assert isinstance(gap, Gap) and gap.after == ids[5] and gap.first_available == ids[8]
        rest = await anext(reader)
        assert [i for _, i, _ in rest] == ids[8:]
    finally:
        await reader.aclose()


async def test_a_reader_that_keeps_up_is_told_of_no_gap(real_redis: AnyRedis, keys: StreamKeys) -> None:
    """Full batches from a stream that is trimmed behind the reader, never past it: no gap."""
    key = keys.tag("poem")
    ids = await write(real_redis, key, *[token("j", i, str(i)) for i in range(9)])
    reader = StreamReader(real_redis, {key: "0-0"}, count=3, block_ms=100).batches()
    try:
        seen: list[str] = []
        while len(seen) < 9:
            batch = await anext(reader)
            assert not isinstance(batch, Gap), batch
            seen += [i for _, i, _ in batch]
            await real_redis.xtrim(key, maxlen=9 - len(seen) + 1, approximate=False)  # keeps the last one read
        assert seen == ids
    finally:
        await reader.aclose()


@pytest.mark.parametrize(("protocol", "decode_responses"), [(2, False), (2, True), (3, False), (3, True)])
async def test_any_client_configuration_reads_the_same_entries(
    redis_server: RedisServerProcess, protocol: int, decode_responses: bool
) -> None:
    """The reader takes XREAD replies as Redis sends them: RESP2 or RESP3, decoded or not."""
    client = Redis.from_url(redis_server.url, protocol=protocol, decode_responses=decode_responses)
    job = f"resp{protocol}{int(decode_responses)}"
    key = StreamKeys().job(job)
    expected = [entry(EntryType.TOKEN, job, i, content=f"t{i}", meta={"ls_model_name": "m"}) for i in (1, 2, 3)]
    await client.xadd(key, entry(EntryType.START, job, 0).encode())  # type: ignore[arg-type]
    for e in [*expected, entry(EntryType.END, job, 4)]:
        await client.xadd(key, e.encode())  # type: ignore[arg-type]
    got = [e async for e in subscribe(client, jobs=[job], start="0", types=["token"])]
    await client.aclose()
    assert [(e.content, e.meta, e.stream) for e in got] == [(e.content, e.meta, key) for e in expected]
