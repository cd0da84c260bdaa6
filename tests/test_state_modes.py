"""The updates and values modes and the job's result, end to end (real redis-server, real HTTP to
the offline model): entries in order with contiguous seqs, the final state in the job's view,
state that is not all JSON or too large published valid, capped and marked, default jobs as
they were; and how the consumer side shows them (JobView, tail's printer, enqueue --mode)."""

from __future__ import annotations

import io
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from tests.support import JOKE, POEM, follow_job, read_stream, text_of
from tokenbus.cli import build_parser
from tokenbus.consumer.jobs import JobView, job_result
from tokenbus.consumer.output import Printer
from tokenbus.schemas.entries import STATE_TYPES, Entry, EntryType
from tokenbus.schemas.state import TRUNCATED, UNSERIALIZABLE
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.settings import Settings

GRAPHS = {"odd_state": "tests.graphs:odd_state"}
START, TOKEN, UPDATE, VALUES, END = EntryType.START, EntryType.TOKEN, EntryType.UPDATE, EntryType.VALUES, EntryType.END


async def test_a_job_with_updates_and_values_publishes_them_in_order_and_keeps_its_final_state(
    settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    job_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages", "updates", "values"])
    await run_burst_worker()
    job = await read_stream(redis, settings.keys.job(job_id))
    final = {"topic": "cats", "joke": JOKE, "poem": POEM}

    # the input's state, the model's tokens, the node's output, the state after it, the end
    tokens = sum(e.type is TOKEN for e in job)
    assert [e.type for e in job] == [START, VALUES, *[TOKEN] * tokens, UPDATE, VALUES, END]
    assert [e.seq for e in job] == list(range(len(job)))
    assert text_of(job) == JOKE + POEM and job[-1].data["chunks"] == tokens  # state entries are not chunks
    update, values = job[-3], [e for e in job if e.type is VALUES]
    assert (update.node, update.data, update.tags, update.meta) == ("call_model", {"joke": JOKE, "poem": POEM}, (), {})
    assert [e.data for e in values] == [{"topic": "cats"}, final]
    assert all(e.node == "" and e.meta == {} for e in values)  # the top graph's: no namespace
    assert job[-1].data["result"] == final

    for tag in ("joke", "poem"):  # the tag streams: chunks and the end, without the result
        stream = await read_stream(redis, settings.keys.tag(tag))
        assert {e.type for e in stream} == {TOKEN, END}
        assert "result" not in stream[-1].data and stream[-1].seq == job[-1].seq

    view = await job_result(redis, job_id, prefix=settings.prefix)
    assert (view.status, view.complete, view.text) == (END, True, JOKE + POEM)
    assert (view.result, view.state, view.updates, view.chunks) == (final, final, ["call_model"], tokens)
    followed, _ = await follow_job(redis, settings.prefix, job_id)
    assert (followed.result, followed.state, followed.updates) == (final, final, ["call_model"])


async def test_default_jobs_publish_no_state_entries_and_keep_their_result(
    settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    job_id = await client.enqueue("joke_poem", {"topic": "cats"})  # modes: messages and custom
    await run_burst_worker()
    job = await read_stream(redis, settings.keys.job(job_id))
    assert {e.type for e in job} == {START, TOKEN, END}
    assert [e.seq for e in job] == list(range(len(job)))
    assert job[-1].data == {
        "chunks": len(job) - 2, "elapsed_ms": job[-1].data["elapsed_ms"], "lost": 0,
        "result": {"topic": "cats", "joke": JOKE, "poem": POEM},
    }  # fmt: skip
    view = await job_result(redis, job_id, prefix=settings.prefix)
    assert (view.result, view.updates, view.state) == ({"topic": "cats", "joke": JOKE, "poem": POEM}, [], None)


@pytest.mark.parametrize("modes", [["updates", "values"], ["custom"]])
async def test_state_that_is_not_json_or_too_large_is_published_valid_capped_and_marked(
    modes: list[str], settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    """A node returns an object with no JSON form and a 100 kB string; the cap is 1 KiB. Every
    state entry and the result are valid JSON within the cap, the object and the string marked,
    the small values kept; the job ends well."""
    job_id = await client.enqueue("odd_state", {"topic": "kept", "size": 100_000}, modes=modes)
    await run_burst_worker(graphs=GRAPHS, state_max_bytes=1024)
    key = settings.keys.job(job_id)
    job = await read_stream(redis, key)
    assert job[-1].type is END, job[-1].error
    output = {"opaque": {UNSERIALIZABLE: "builtins.object"}, "big": {TRUNCATED: 100_002}}
    final = {"topic": "kept", "size": 100_000, **output}
    assert job[-1].data["result"] == final
    if modes == ["custom"]:
        assert [e.type for e in job] == [START, END]
        return
    assert [e.type for e in job] == [START, VALUES, UPDATE, VALUES, END]
    assert [e.data for e in job[1:4]] == [{"topic": "kept", "size": 100_000}, output, final]
    for _, fields in await redis.xrange(key):
        data = fields[b"data"]
        orjson.loads(data)  # valid JSON, every one
        if fields[b"type"] in (b"update", b"values"):
            assert len(data) <= 1024
    view = await job_result(redis, job_id, prefix=settings.prefix)
    assert (view.result, view.state, view.updates) == (final, final, ["odd"])


def _entry(kind: EntryType, seq: int, attempt: int = 1, **fields: Any) -> Entry:
    return Entry(type=kind, job="j", attempt=attempt, seq=seq, ts=0, **fields)


def test_the_job_view_folds_state_entries_and_starts_over_with_a_new_attempt() -> None:
    view = JobView("j")
    for entry in (
        _entry(START, 0),
        _entry(VALUES, 1, data={"a": 1}),
        _entry(UPDATE, 2, node="inner", data={"b": 2}, meta={"langgraph_checkpoint_ns": "sub:1"}),
        _entry(VALUES, 3, data={"b": 2}, meta={"langgraph_checkpoint_ns": "sub:1"}),  # a subgraph's state
        _entry(UPDATE, 4, node="sub", data={"b": 2}),
        _entry(VALUES, 5, data={"a": 1, "b": 2}),
    ):
        view.apply(entry)
    assert (view.updates, view.state, view.result, view.chunks, view.missing) == (
        ["inner", "sub"], {"a": 1, "b": 2}, None, 0, 0,
    )  # fmt: skip
    view.apply(_entry(START, 0, attempt=2))
    assert (view.updates, view.state, view.result) == ([], None, None)
    view.apply(_entry(END, 1, attempt=2, data={"chunks": 0, "result": {"a": 3}}))
    assert (view.status, view.result, view.complete) == (END, {"a": 3}, True)


def test_a_broken_result_leaves_the_view_without_one() -> None:
    end = Entry.decode(_entry(END, 0).encode() | {b"data": b'{"result": '})
    view = JobView("j")
    view.apply(end)
    assert (view.status, view.result) == (END, None)


def test_tail_shows_updates_as_notices_and_state_entries_as_json_lines() -> None:
    entries = [
        _entry(START, 0),
        _entry(VALUES, 1, data={"topic": "cats"}),
        _entry(UPDATE, 2, node="call_model", data={"joke": "ha"}),
        _entry(END, 3, data={"result": {"topic": "cats", "joke": "ha"}}),
    ]
    out, err = io.StringIO(), io.StringIO()
    text = Printer(out, err)
    for entry in entries:
        text.show(entry)
    assert out.getvalue() == "\n"
    assert err.getvalue().splitlines() == [
        "[tokenbus] job j: attempt 1 started",
        "[tokenbus] job j: update from node call_model",
        "[tokenbus] job j: attempt 1 end",
    ]
    out = io.StringIO()
    jsonl = Printer(out, io.StringIO(), format="jsonl")
    for entry in entries:
        jsonl.show(entry)
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [(d["type"], d["node"], d["data"]) for d in lines[1:3]] == [
        ("values", "", {"topic": "cats"}), ("update", "call_model", {"joke": "ha"}),
    ]  # fmt: skip
    assert lines[3]["data"]["result"] == {"topic": "cats", "joke": "ha"}
    assert {EntryType(d["type"]) for d in lines} & STATE_TYPES == STATE_TYPES


def test_enqueue_takes_every_stream_mode_and_refuses_others(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["enqueue", "g", "--mode", "updates", "--mode", "values", "--mode", "messages"])
    assert args.mode == ["updates", "values", "messages"]
    with pytest.raises(SystemExit):
        parser.parse_args(["enqueue", "g", "--mode", "debug"])
    assert "invalid choice: 'debug'" in capsys.readouterr().err
