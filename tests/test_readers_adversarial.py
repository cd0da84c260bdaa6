"""The reading side against what real streams hold: chunks copied to several followed tag streams
(or to one of them only, under a job's tag filter), entries whose ``data``/``meta`` is broken JSON,
job streams trimmed past their start, and job streams holding a superseded attempt.

Every reader is checked: ``tokenbus tail`` (a real process), ``subscribe``, ``job_result`` and
consumer groups."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.graph import START, StateGraph
from redis.asyncio import Redis

from tests.conftest import STREAMS, RunWorker
from tests.graphs import State, WordsModel
from tests.support import Process, entry, read_stream, settings_env, wait_for
from tokenbus.consumer._redis_cluster import AnyRedis
from tokenbus.consumer.attempts import Restart
from tokenbus.consumer.groups import GroupConsumer
from tokenbus.consumer.jobs import job_result
from tokenbus.consumer.reader import Gap
from tokenbus.consumer.subscribe import subscribe
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.schemas.errors import MalformedEntry
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.redis_client import StreamsRedis
from tokenbus.worker.settings import Settings


async def _two_tags(state: State, config: RunnableConfig) -> State:
    await WordsModel(text="only a", tags=["a"]).ainvoke("go", config)
    await WordsModel(text=" ".join(f"shared{i}" for i in range(state.get("n", 30))), tags=["a", "b"]).ainvoke(
        "go", config
    )
    await WordsModel(text="only b", tags=["b"]).ainvoke("go", config)
    return {"done": True}


two_tags = StateGraph(State).add_node("node", _two_tags).add_edge(START, "node").compile()
GRAPHS = {"two_tags": "tests.test_readers_adversarial:two_tags"}


def words(job: str, attempt: int, text: str, first_seq: int = 1) -> list[Entry]:
    return [
        entry(EntryType.TOKEN, job, first_seq + i, attempt, content=f"{w} ", tags=("poem",), node="n")
        for i, w in enumerate(text.split())
    ]


async def write(redis: AnyRedis, key: str, *entries: Entry | dict[str, str]) -> None:
    for e in entries:
        await redis.xadd(key, e.encode() if isinstance(e, Entry) else e)  # type: ignore[arg-type]


def jsonl(lines: list[str]) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in lines if line.startswith("{")]


# -- a chunk in several followed tag streams is passed on once ---------------------------------------


@pytest.mark.parametrize("settings", STREAMS, indirect=True)  # on a Redis Cluster, a and b are on different masters
@pytest.mark.parametrize("fan_out", [None, ["b"]], ids=["every-tag", "filter-b"])
async def test_a_chunk_tagged_with_two_followed_tags_is_seen_once_by_every_reader(
    fan_out: list[str] | None, settings: Settings, client: TokenbusClient, streams: StreamsRedis,
    run_burst_worker: RunWorker,
) -> None:  # fmt: skip
    job = await client.enqueue("two_tags", {"n": 30}, modes=["messages"], tags=fan_out)
    await run_burst_worker(graphs=GRAPHS)
    followed = {"a", "b"}
    # what a reader of a and b must get: each chunk written to one of their streams, once, in job order
    expected = [
        (e.seq, e.content)
        for e in await read_stream(streams, settings.keys.job(job))
        if e.is_chunk and followed & set(e.tags) & set(fan_out or e.tags)
    ]
    assert sum("shared" in content for _, content in expected) == 30

    got = [
        (item.seq, item.content)
        async for item in subscribe(streams, tags=["a", "b"], jobs=[job], prefix=settings.prefix, start="0")
        if isinstance(item, Entry) and item.is_chunk
    ]
    assert sorted(got) == expected

    tail = await Process.start(
        "tail", "--tag", "a", "--tag", "b", "--job", job, "--until-final", "--from-start", "--format", "jsonl",
        env=settings_env(settings),
    )  # fmt: skip
    assert await tail.wait() == 0, tail.output
    printed = [(e["seq"], e["content"]) for e in jsonl(tail.stdout) if e["type"] == "token"]
    assert sorted(printed) == expected

    handled: Counter[tuple[int, str]] = Counter()

    async def handler(e: Entry) -> None:
        if e.is_chunk:
            handled[(e.seq, e.content)] += 1

    tag_keys = [settings.keys.tag("a"), settings.keys.tag("b")]
    consumers = [
        GroupConsumer(streams, tag_keys, "g", name, keys=settings.keys, start="0", count=8, block_ms=100)
        for name in ("c1", "c2")  # the copies of one chunk can go to different consumers of the group
    ]
    await consumers[0].ensure_groups()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.run(handler, stop=stop)) for c in consumers]

    async def group_done() -> bool:
        for stream in tag_keys:
            for group in await streams.xinfo_groups(stream):
                if group["pending"] or group["lag"]:
                    return False
        return sum(c.acked for c in consumers) == sum([await streams.xlen(s) for s in tag_keys])

    try:
        await wait_for(group_done, what="the group to have acked both streams")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert sorted(handled.elements()) == expected


# -- an entry whose data or meta is broken JSON is skipped, with a notice ----------------------------


def _broken(job: str, seq: int, field: bytes) -> dict[bytes, bytes]:
    fields = entry(EntryType.TOKEN, job, seq, content="BROKEN", tags=("poem",), node="n").encode()
    fields[field] = b'{"not json'
    return fields  # type: ignore[return-value]


@pytest.mark.parametrize("settings", STREAMS, indirect=True)
@pytest.mark.parametrize("fmt", ["jsonl", "text"])
async def test_tail_skips_an_entry_with_broken_json_and_goes_on(
    fmt: str, settings: Settings, streams: StreamsRedis
) -> None:
    key = settings.keys.job("j")
    good = words("j", 1, "one two three")
    await write(
        streams, key, entry(EntryType.START, "j", 0), good[0], _broken("j", 2, b"data"), _broken("j", 3, b"meta"),
        *words("j", 1, "two three", first_seq=4), entry(EntryType.END, "j", 6),
    )  # fmt: skip
    tail = await Process.start("tail", "--job", "j", "--from-start", "--format", fmt, env=settings_env(settings))
    assert await tail.wait() == 0, tail.output
    if fmt == "jsonl":
        printed = jsonl(tail.stdout)
        assert [(e["type"], e["seq"]) for e in printed] == [
            ("start", 0),
            ("token", 1),
            ("token", 4),
            ("token", 5),
            ("end", 6),
        ]
    else:
        assert tail.stdout == ["one two three "]
    skipped = [line for line in tail.stderr if "skipping entry" in line]
    assert len(skipped) == 2 and "data" in skipped[0] and "meta" in skipped[1], tail.output


@pytest.mark.parametrize("settings", STREAMS, indirect=True)
async def test_subscribe_parses_json_eagerly_when_asked(streams: StreamsRedis, settings: Settings) -> None:
    key = settings.keys.job("j")
    await write(streams, key, entry(EntryType.START, "j", 0), _broken("j", 1, b"meta"), entry(EntryType.END, "j", 2))
    lazy = [i async for i in subscribe(streams, jobs=["j"], prefix=settings.prefix, start="0")]
    assert [i.type for i in lazy] == ["start", "token", "end"]
    with pytest.raises(MalformedEntry, match="meta"):
        _ = lazy[1].meta  # type: ignore[union-attr]
    eager = [i async for i in subscribe(streams, jobs=["j"], prefix=settings.prefix, start="0", parse_json=True)]
    assert [i.type for i in eager] == ["start", "end"]
    with pytest.raises(MalformedEntry, match="meta"):
        async for _ in subscribe(
            streams, jobs=["j"], prefix=settings.prefix, start="0", parse_json=True, on_malformed="raise"
        ):
            pass


@pytest.mark.parametrize("settings", STREAMS, indirect=True)
async def test_a_group_dead_letters_an_entry_its_handler_cannot_parse_at_once(
    streams: StreamsRedis, settings: Settings
) -> None:
    keys = settings.keys
    key = keys.tag("poem")
    await write(streams, key, *words("j", 1, "one"), _broken("j", 2, b"data"), *words("j", 1, "three", first_seq=3))
    deliveries: Counter[int] = Counter()
    seen: list[str] = []

    async def reads_the_payload(e: Entry) -> None:
        deliveries[e.seq] += 1
        _ = e.data
        seen.append(e.content)

    consumer = GroupConsumer(
        streams, [key], "g", "c1", keys=keys, start="0", claim_idle_ms=50, max_deliveries=5, block_ms=50
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(reads_the_payload, stop=stop))
    try:
        await wait_for(lambda: _acked(consumer, 3), what="three entries acked or dead-lettered")
    finally:
        stop.set()
        await task
    assert seen == ["one ", "three "] and consumer.dead == 1 and deliveries[2] == 1
    [(_, dead)] = await streams.xrange(keys.dead_letter)
    assert b"data" in dead[b"dead_reason"]


async def _acked(consumer: GroupConsumer, n: int) -> bool:
    return consumer.acked + consumer.dead >= n


# -- a job stream trimmed past its start is reported, not passed for the whole -----------------------


async def test_replaying_a_trimmed_job_stream_reports_the_gap(
    settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker: RunWorker
) -> None:
    job = await client.enqueue("two_tags", {"n": 300}, modes=["messages"])
    await run_burst_worker(graphs=GRAPHS, job_maxlen=100)
    key = settings.keys.job(job)
    held = await read_stream(redis, key)
    assert held[0].seq > 0 and held[-1].type is EntryType.END  # MAXLEN ~ took the start and more

    tail = await Process.start("tail", "--job", job, "--from-start", env=settings_env(settings))
    assert await tail.wait() == 3, tail.output
    assert any(f"gap in {key}" in line for line in tail.stderr), tail.output

    items = [i async for i in subscribe(redis, jobs=[job], prefix=settings.prefix, start="0")]
    assert isinstance(items[0], Gap) and items[0].first_available == held[0].id

    view = await job_result(redis, job, prefix=settings.prefix)
    assert (view.status, view.complete, view.missing) == (EntryType.END, False, held[0].seq)
    waited = await job_result(redis, job, prefix=settings.prefix, wait=True)
    assert (waited.complete, waited.missing, waited.text) == (False, held[0].seq, view.text)


async def test_a_whole_job_stream_is_complete(redis: Redis, settings: Settings) -> None:
    await write(
        redis,
        settings.keys.job("j"),
        entry(EntryType.START, "j", 0),
        *words("j", 1, "a b"),
        entry(EntryType.END, "j", 3),
    )
    view = await job_result(redis, "j", prefix=settings.prefix)
    assert (view.complete, view.missing, view.text) == (True, 0, "a b ")


# -- a replay passes on the newest attempt only; a live reader is told to start over -----------------


INTERRUPTED = [entry(EntryType.START, "j", 0), *words("j", 1, "half of it"), entry(EntryType.ERROR, "j", 4, retry=True)]
SECOND = [
    entry(EntryType.START, "j", 0, attempt=2),
    *words("j", 2, "the whole answer"),
    entry(EntryType.END, "j", 4, attempt=2),
]


@pytest.mark.parametrize("fmt", ["jsonl", "text"])
async def test_replaying_a_restarted_job_shows_the_newest_attempt_only(
    fmt: str, settings: Settings, redis: Redis
) -> None:
    await write(redis, settings.keys.job("j"), *INTERRUPTED, *SECOND)
    tail = await Process.start("tail", "--job", "j", "--from-start", "--format", fmt, env=settings_env(settings))
    assert await tail.wait() == 0, tail.output
    if fmt == "jsonl":
        assert {e["attempt"] for e in jsonl(tail.stdout)} == {2}
    else:
        assert tail.stdout == ["the whole answer "]
    view = await job_result(redis, "j", prefix=settings.prefix)
    assert (view.attempt, view.text, view.complete) == (2, "the whole answer ", True)


async def test_a_live_reader_is_told_when_a_new_attempt_starts_over(settings: Settings, redis: Redis) -> None:
    key = settings.keys.job("j")
    await write(redis, key, *INTERRUPTED)
    jsonl_tail = await Process.start(
        "tail", "--job", "j", "--from-start", "--format", "jsonl", env=settings_env(settings)
    )
    text_tail = await Process.start("tail", "--job", "j", "--from-start", env=settings_env(settings))
    await jsonl_tail.wait_line('"type":"error"', stream="stdout")
    await text_tail.wait_line("attempt 1 error")
    await write(redis, key, *SECOND)
    assert await jsonl_tail.wait() == 0, jsonl_tail.output
    assert await text_tail.wait() == 0, text_tail.output
    lines = jsonl(jsonl_tail.stdout)
    restart = next(i for i, e in enumerate(lines) if e["type"] == "restart")
    assert lines[restart] == {"type": "restart", "job": "j", "attempt": 2, "previous_attempt": 1}
    assert {e["attempt"] for e in lines[:restart]} == {1} and {e["attempt"] for e in lines[restart + 1 :]} == {2}
    assert any("attempt 1 was interrupted; attempt 2 starts over" in line for line in text_tail.stderr)
    assert text_tail.stdout == ["half of it ", "the whole answer "]

    items = []
    async for item in subscribe(redis, jobs=["j"], prefix=settings.prefix, resume={key: "0-0"}):
        items.append(item)
    assert not any(isinstance(i, Restart) for i in items)  # a replay starts with the newest attempt
