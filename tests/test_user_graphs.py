"""User graphs loaded by import path; hostile payloads; bursts larger than the publisher's buffer."""

from __future__ import annotations

import shlex
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from langchain_core.messages import AIMessage
from redis.asyncio import Redis

from tests.graphs import every_chunk, sync_subgraph
from tests.support import Process, read_stream, settings_env, text_of
from tokenbus.consumer.reader import parse_id
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.schemas.errors import GraphLoadError
from tokenbus.worker import streaming
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.emitter import JobEmitter
from tokenbus.worker.offline_model import script_for
from tokenbus.worker.registry import load_graph
from tokenbus.worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
GRAPHS = {
    "burst": "tests.graphs:burst",
    "burst_tokens": "tests.graphs:burst_tokens",
    "every_chunk": "tests.graphs:every_chunk",
    "bad_model_tags": "tests.graphs:bad_model_tags",
    "bad_model_tags_sync": "tests.graphs:bad_model_tags_sync",
    "swallowed_bad_model_tags": "tests.graphs:swallowed_bad_model_tags",
    "bad_payload": "tests.graphs:bad_payload",
    "swallowed_bad_payload": "tests.graphs:swallowed_bad_payload",
    "bad_tags": "tests.graphs:bad_tags",
    "nested": "tests.graphs:nested",
    "changing_tags": "tests.graphs:changing_tags",
    "sync_subgraph": "tests.graphs:sync_subgraph",
}


@pytest.mark.parametrize(("graph", "mode"), [("burst", "custom"), ("burst_tokens", "messages")])
async def test_burst_larger_than_the_buffer_arrives_whole_and_in_order(
    graph: str, mode: str, settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    job_id = await client.enqueue(graph, {"n": 20_000}, modes=[mode])
    await run_burst_worker(graphs=GRAPHS, publish_buffer_max=300, publish_batch_max=64)
    job = await read_stream(redis, settings.keys.job(job_id))
    contents = [e.content for e in job if e.is_chunk and e.content]  # a model's last chunk is empty
    assert contents == [f"{i} " for i in range(20_000)]
    assert job[-1].type is EntryType.END
    assert await redis.xlen(settings.keys.tag("burst")) == len([e for e in job if e.is_chunk]) + 1


async def test_a_model_that_never_waits_is_published_while_it_runs(
    settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    """The publisher is a task of the worker's event loop; a model that never suspends would starve
    it until the job ends. The model's token callback yields to it, so writing overlaps producing.
    (A node's ``writer(...)`` is a plain call: a node that never suspends holds the loop until it
    does, as it holds ``astream``'s own consumer.)"""
    job_id = await client.enqueue("burst_tokens", {"n": 20_000}, modes=["messages"])
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
    ("graph", "mode", "message"),
    [
        ("bad_payload", "custom", "a custom chunk from node ? is not JSON-serialisable"),
        ("swallowed_bad_payload", "custom", "a custom chunk from node ? is not JSON-serialisable"),
        ("bad_tags", "custom", "invalid tag 'has space'"),
        ("bad_model_tags", "messages", "invalid tag 'has space'"),
        ("bad_model_tags_sync", "messages", "invalid tag 'has space'"),  # emitted from a thread
        ("swallowed_bad_model_tags", "messages", "invalid tag 'has space'"),
    ],
)
async def test_hostile_payloads_fail_their_job_only(
    graph: str, mode: str, message: str, settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    bad = await client.enqueue(graph, {}, modes=[mode])
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


def _graphs(namespace: tuple[str, ...] | str) -> tuple[str, ...]:
    """A namespace without its task ids (they differ from run to run)."""
    if isinstance(namespace, str):
        namespace = tuple(namespace.split("|")) if namespace else ()
    return tuple(part.partition(":")[0] for part in namespace)


def _as_json(value: Any) -> Any:
    """The JSON a state is published as, made here independently: messages as their model_dump()."""
    return orjson.loads(orjson.dumps(value, default=lambda o: o.model_dump()))


def _chunk_keys(mode: str, chunk: Any, namespace: tuple[str, ...] | str) -> list[tuple[Any, ...]]:
    """What both sides must agree on: kind, text, node, tags, state as JSON, and the graph namespace."""
    if mode == "messages":
        message, meta = chunk
        return [("token", message.content, meta["langgraph_node"], tuple(meta.get("tags", ())))]
    if mode == "custom":
        return [("custom", chunk["content"], tuple(chunk.get("tags", ())), _graphs(namespace))]
    if mode == "updates":
        return [("update", node, _as_json(output), _graphs(namespace)) for node, output in chunk.items()]
    return [("values", _as_json(chunk), _graphs(namespace))]


def _entry_keys(entry: Entry) -> list[tuple[Any, ...]]:
    namespace = entry.meta.get("langgraph_checkpoint_ns", "")
    if entry.type is EntryType.TOKEN:
        return [("token", entry.content, entry.node, entry.tags)]
    if entry.type is EntryType.CUSTOM:
        return _chunk_keys("custom", entry.data, namespace)
    if entry.type is EntryType.UPDATE:
        return [("update", entry.node, entry.data, _graphs(namespace))]
    if entry.type is EntryType.VALUES:
        return [("values", entry.data, _graphs(namespace))]
    return []


KINDS = {"messages": "token", "custom": "custom", "updates": "update", "values": "values"}


@pytest.mark.parametrize("path", ["fast", "public"])
@pytest.mark.parametrize(
    "modes",
    [
        ["messages"],
        ["custom"],
        ["messages", "custom"],
        ["updates", "values"],
        ["messages", "custom", "updates", "values"],
    ],
)
async def test_jobs_publish_what_langgraph_streams(
    modes: list[str],
    path: str,
    settings: Settings,
    client: TokenbusClient,
    redis: Redis,
    run_burst_worker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tokens of async and sync nodes and of a subgraph, a message a node returns, nothing of a
    ``nostream`` model; ``custom`` payloads of async and sync nodes and of a subgraph, between the
    tokens; each node's output (``updates``) and the state after each step (``values``), the
    subgraph's too. The job publishes what ``astream(stream_mode=modes, subgraphs=True)`` yields,
    in order, on the fast path and on the public one (taken where LangGraph's private parts are
    not there); its ``end`` carries the final state ``ainvoke`` returns, whatever the modes."""
    assert streaming.fast_stream is not None, "the fast path did not load with the LangGraph installed"
    if path == "public":
        monkeypatch.setattr(streaming, "fast_stream", None)
    expected = [
        key
        async for namespace, mode, chunk in every_chunk.astream({}, stream_mode=modes, subgraphs=True)
        for key in _chunk_keys(mode, chunk, namespace)
    ]
    final = _as_json(await every_chunk.ainvoke({}))
    job_id = await client.enqueue("every_chunk", {}, modes=modes)
    await run_burst_worker(graphs=GRAPHS)
    job = await read_stream(redis, settings.keys.job(job_id))
    published = [key for e in job for key in _entry_keys(e)]
    assert published == expected
    assert {key[0] for key in expected} == {KINDS[mode] for mode in modes}
    assert ("custom", "threaded again ", (), ()) in expected or "custom" not in modes  # from a sync node
    assert ("custom", "nested payload ", ("w",), ("sub",)) in expected or "custom" not in modes  # from a subgraph
    assert ("update", "inner_model", None, ("sub",)) in expected or "updates" not in modes  # from a subgraph
    assert "never" not in text_of(job) and job[-1].type is EntryType.END
    assert [e.seq for e in job] == list(range(len(job)))
    assert job[-1].data["result"] == final == {"messages": [_as_json(AIMessage("a whole answer", id="answer-1"))]}
    for tag in ("a", "b", "c", "w"):
        stream = await read_stream(redis, settings.keys.tag(tag))
        assert all(e.is_chunk for e in stream[:-1])  # state entries stay in the job stream, and so does the result
        assert not stream or (stream[-1].type is EntryType.END and "result" not in stream[-1].data)
    if "messages" in modes:
        assert text_of(await read_stream(redis, settings.keys.tag("c"))) == "nested three "


async def test_chunks_of_sync_nodes_are_emitted_on_the_event_loop_thread(
    client: TokenbusClient, run_burst_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sync nodes run in threads, where their models call back and their writers are called; the
    emitter and publisher are not thread-safe, so their chunks are handed to the loop's thread, as
    LangGraph does."""
    threads: list[int] = []
    for name in ("message", "custom"):
        emit = getattr(JobEmitter, name)

        def recording(self: JobEmitter, *args: Any, emit: Any = emit) -> None:
            threads.append(threading.get_ident())
            emit(self, *args)

        monkeypatch.setattr(JobEmitter, name, recording)
    await client.enqueue("every_chunk", {}, modes=["messages", "custom"])
    await run_burst_worker(graphs=GRAPHS)
    assert len(threads) == 15 and set(threads) == {threading.get_ident()}


@pytest.mark.parametrize("path", ["fast", "public"])
async def test_state_chunks_of_a_subgraph_run_in_a_sync_nodes_thread_are_emitted_on_the_event_loop_thread(
    path: str,
    settings: Settings,
    client: TokenbusClient,
    redis: Redis,
    run_burst_worker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sync node invoking a subgraph runs the subgraph's loop in its thread, which is where
    LangGraph hands over the subgraph's ``updates`` and ``values`` chunks: they reach the emitter on
    the event loop's thread, in the order ``astream`` yields them."""
    if path == "public":
        monkeypatch.setattr(streaming, "fast_stream", None)
    threads: list[int] = []
    for name in ("update", "values"):
        emit = getattr(JobEmitter, name)

        def recording(self: JobEmitter, *args: Any, emit: Any = emit) -> None:
            threads.append(threading.get_ident())
            emit(self, *args)

        monkeypatch.setattr(JobEmitter, name, recording)
    modes = ["updates", "values"]
    expected = [
        key
        async for namespace, mode, chunk in sync_subgraph.astream({"n": 1}, stream_mode=modes, subgraphs=True)
        for key in _chunk_keys(mode, chunk, namespace)
    ]
    threads.clear()
    job_id = await client.enqueue("sync_subgraph", {"n": 1}, modes=modes)
    await run_burst_worker(graphs=GRAPHS)
    job = await read_stream(redis, settings.keys.job(job_id))
    assert [key for e in job for key in _entry_keys(e)] == expected
    assert ("update", "leaf", {"done": True}, ("calls",)) in expected
    assert len(threads) == len(expected) and set(threads) == {threading.get_ident()}  # one node per update chunk
    assert job[-1].data["result"] == {"n": 1, "done": True}


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


async def test_the_readmes_example_graph_runs_as_written_from_a_project_directory(
    settings: Settings, tmp_path: Path
) -> None:
    """README's "Writing your own graph": its module and its two commands, run from the project's
    directory with no API key (every graph then talks to the offline model)."""
    section = (ROOT / "README.md").read_text().split("## Writing your own graph", 1)[1]
    module = section.split("```python\n", 1)[1].split("```", 1)[0]
    commands = section.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    path = module.splitlines()[0].removeprefix("# ")
    (tmp_path / path).parent.mkdir(parents=True)
    (tmp_path / path).write_text(module)
    worker_line, enqueue_line = (shlex.split(line.replace("./dev tokenbus", "tokenbus")) for line in commands)
    graphs = worker_line[0].removeprefix("TOKENBUS_GRAPHS=")
    offline = settings.model_copy(update={"openai_base_url": None, "openai_api_key": None})
    env = settings_env(offline) | {"TOKENBUS_GRAPHS": graphs, "TOKENBUS_OFFLINE_TOKENS_PER_S": "0"}

    worker = await Process.start(*worker_line[2:], env=env, name="worker", cwd=tmp_path)
    try:
        await worker.wait_line("worker serves graphs: answer, joke_poem")
        enqueue = await Process.start(*enqueue_line[1:], env=env, name="enqueue", cwd=tmp_path)
        assert await enqueue.wait() == 0, enqueue.output + worker.output
    finally:
        await worker.stop()
    question = orjson.loads(enqueue_line[enqueue_line.index("--input") + 1])["messages"][-1]["content"]
    assert "".join(enqueue.stdout[1:]).strip() == script_for(question).strip(), enqueue.output
