"""User graphs loaded by import path; hostile payloads; bursts larger than the publisher's buffer."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from consumer.reader import parse_id
from schemas.entries import EntryType
from schemas.errors import GraphLoadError
from tests.support import read_stream
from tokenbus.settings import Settings
from worker.client import TokenbusClient
from worker.registry import load_graph

GRAPHS = {
    "burst": "tests.graphs:burst",
    "bad_payload": "tests.graphs:bad_payload",
    "bad_tags": "tests.graphs:bad_tags",
    "nested": "tests.graphs:nested",
    "changing_tags": "tests.graphs:changing_tags",
}


async def test_burst_larger_than_the_buffer_arrives_whole_and_in_order(
    settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    job_id = await client.enqueue("burst", {"n": 20_000}, modes=["custom"])
    await run_burst_worker(graphs=GRAPHS, publish_buffer_max=300, publish_batch_max=64)
    job = await read_stream(redis, settings.keys.job(job_id))
    chunks = [e for e in job if e.is_chunk]
    assert [e.content for e in chunks] == [f"{i} " for i in range(20_000)]
    assert job[-1].type is EntryType.END
    assert await redis.xlen(settings.keys.tag("burst")) == 20_001


async def test_a_graph_that_never_waits_is_published_while_it_runs(
    settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    """The publisher is a task of the worker's event loop; a node that never suspends would starve
    it until the job ends. The job yields to it, so writing overlaps producing."""
    job_id = await client.enqueue("burst", {"n": 20_000}, modes=["custom"])
    await run_burst_worker(graphs=GRAPHS)
    job = await read_stream(redis, settings.keys.job(job_id))
    first_chunk, last_chunk = job[1], job[-2]
    assert first_chunk.id is not None
    written_ms = parse_id(first_chunk.id)[0]  # Redis's clock when it took the XADD
    assert written_ms < last_chunk.ts, "the first chunk reached Redis only after the last was produced"


async def test_stream_caps_bound_the_streams(
    settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    await client.enqueue("burst", {"n": 5000}, modes=["custom"])
    await run_burst_worker(graphs=GRAPHS, tag_maxlen=1000)
    assert 1000 <= await redis.xlen(settings.keys.tag("burst")) < 1200  # MAXLEN ~ trims whole nodes


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        ("bad_payload", "a custom chunk from node ? is not JSON-serialisable"),
        ("bad_tags", "invalid tag 'has space'"),
    ],
)
async def test_hostile_payloads_fail_their_job_only(
    graph: str, message: str, settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    bad = await client.enqueue(graph, {}, modes=["custom"])
    good = await client.enqueue("burst", {"n": 3}, modes=["custom"])
    await run_burst_worker(graphs=GRAPHS, max_jobs=1)
    bad_stream = await read_stream(redis, settings.keys.job(bad))
    assert bad_stream[-1].type is EntryType.ERROR and message in bad_stream[-1].error, bad_stream[-1].error
    assert (await read_stream(redis, settings.keys.job(good)))[-1].type is EntryType.END


async def test_subgraph_chunks_are_streamed(
    settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    job_id = await client.enqueue("nested", {}, modes=["custom"])
    await run_burst_worker(graphs=GRAPHS)
    chunks = [e for e in await read_stream(redis, settings.keys.job(job_id)) if e.is_chunk]
    assert [(e.content, e.tags) for e in chunks] == [("from the subgraph", ("sub",))]
    assert chunks[0].meta["langgraph_checkpoint_ns"].startswith("parent:")


async def test_each_custom_chunk_goes_to_the_streams_of_its_own_tags(
    settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    job_id = await client.enqueue("changing_tags", {}, modes=["custom"])
    await run_burst_worker(graphs=GRAPHS)
    chunks = [e for e in await read_stream(redis, settings.keys.job(job_id)) if e.is_chunk]
    assert [(e.content, e.tags) for e in chunks] == [
        ("1", ("a",)), ("2", ("a", "b")), ("3", ("b",)), ("4", ()), ("5", ("a",)),
    ]  # fmt: skip
    assert chunks[-1].node == "node" and chunks[-1].data == {"content": "5"}
    for tag, contents in (("a", ["1", "2", "5"]), ("b", ["2", "3"])):
        stream = await read_stream(redis, settings.keys.tag(tag))
        assert [e.content for e in stream if e.is_chunk] == contents
        assert stream[-1].type is EntryType.END


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("tests.graphs", "must look like 'package.module:attribute'"),
        ("tests.nope:graph", "cannot import 'tests.nope'"),
        ("tests.graphs:missing", "has no attribute 'missing'"),
        ("tests.graphs:GRAPHS_NOT_HERE", "has no attribute"),
        ("tests.graphs:State", "is a dict, not a LangGraph graph"),
    ],
)
def test_graph_paths_that_do_not_load_say_why(path: str, message: str) -> None:
    with pytest.raises(GraphLoadError, match=message):
        load_graph(path)
