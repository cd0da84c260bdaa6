"""Adaptive coalescing (``TOKENBUS_COALESCE=adaptive``): which chunks a congested publisher merges,
and what the merged entries hold; through a real publisher and emitter on a fake connection."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessageChunk

from tests.unit.conftest import StartPublisher
from tests.unit.fake_wire import FakeWire
from tokenbus.consumer.attempts import AttemptFilter
from tokenbus.consumer.jobs import JobView
from tokenbus.consumer.reader import Gap
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.schemas.keys import StreamKeys
from tokenbus.worker.coalesce import MERGE_MAX_CONTENT
from tokenbus.worker.emitter import JobEmitter, Outcome, StreamLimits
from tokenbus.worker.publisher import Publisher

KEYS = StreamKeys("t")
LIMITS = StreamLimits(tag_maxlen=10, job_maxlen=20, job_ttl_s=60)
POEM = {"langgraph_node": "write_poem", "tags": ["poem"], "ls_model_name": "m"}
AFTER = 2
"""``coalesce_after`` of these tests' publishers."""


@pytest.fixture
async def publisher(start_publisher: StartPublisher) -> Publisher:
    return start_publisher(coalesce_after=AFTER)


async def congest(publisher: Publisher, wire: FakeWire) -> None:
    """Hold a batch in flight and queue ``AFTER`` calls of another job behind it: the publisher is
    congested until the test sets ``wire.gate``."""
    other = publisher.sink("other")
    wire.gate.clear()
    publisher.command(other, ("PING",))
    await wire.in_flight.wait()
    for _ in range(AFTER):
        publisher.command(other, ("PING",))
    assert publisher.coalescing


async def written(emitter: JobEmitter, wire: FakeWire) -> list[Entry]:
    wire.gate.set()
    await emitter.sink.flushed()
    return wire.stream(emitter.job_key)


def shape(entries: list[Entry]) -> list[tuple[str, int, int, str]]:
    return [(e.type.value, e.seq, e.n, e.content) for e in entries]


def merged_fields(wire: FakeWire) -> list[bool]:
    """Whether each XADD written carries the ``n`` field."""
    return [b"n" in command[6::2] for command in wire.commands if command[0] == b"XADD"]


async def test_chunks_of_one_call_waiting_in_a_congested_buffer_become_one_entry_on_every_stream(
    publisher: Publisher, wire: FakeWire
) -> None:
    emitter = JobEmitter(publisher, KEYS, LIMITS, "j", 1)
    emitter.start({"graph": "g"})
    await congest(publisher, wire)
    for word in ("a ", "b ", "", "c"):
        emitter.message(AIMessageChunk(content=word, id="run-1"), POEM)
    emitter.finish(Outcome())
    job = await written(emitter, wire)
    assert shape(job) == [("start", 0, 1, ""), ("token", 1, 4, "a b c"), ("end", 5, 1, "")]
    merged = job[1]
    assert (merged.data, merged.meta, merged.tags, merged.node) == ({"id": "run-1"}, POEM, ("poem",), "write_poem")
    assert job[-1].data == {"chunks": 4}  # chunks, not entries
    assert shape(wire.stream(KEYS.tag("poem"))) == [("token", 1, 4, "a b c"), ("end", 5, 1, "")]
    copy = wire.stream(KEYS.tag("poem"))[0]
    assert copy.to_dict() | {"stream": None} == merged.to_dict() | {"stream": None}  # the same entry
    assert (publisher.chunks_merged, publisher.entries_written) == (3, 1 + 2 + 2)


async def test_a_publisher_that_keeps_up_writes_every_chunk_alone(publisher: Publisher, wire: FakeWire) -> None:
    emitter = JobEmitter(publisher, KEYS, LIMITS, "j", 1)
    wire.gate.clear()
    emitter.start({})
    await wire.in_flight.wait()  # a batch in flight, and fewer than AFTER calls behind it
    emitter.message(AIMessageChunk(content="a", id="run-1"), POEM)
    assert not publisher.coalescing
    emitter.message(AIMessageChunk(content="b", id="run-1"), POEM)
    job = await written(emitter, wire)
    assert shape(job) == [("start", 0, 1, ""), ("token", 1, 1, "a"), ("token", 2, 1, "b")]
    assert not any(merged_fields(wire)) and publisher.chunks_merged == 0


async def test_without_coalescing_nothing_is_merged_however_long_the_buffer(
    start_publisher: StartPublisher, wire: FakeWire
) -> None:
    publisher = start_publisher()
    emitter = JobEmitter(publisher, KEYS, LIMITS, "j", 1)
    wire.gate.clear()
    emitter.start({})
    await wire.in_flight.wait()
    for i in range(50):
        emitter.message(AIMessageChunk(content=str(i), id="run-1"), POEM)
    assert not publisher.coalescing
    job = await written(emitter, wire)
    assert [e.n for e in job] == [1] * 51


async def test_a_chunk_merges_only_into_an_entry_still_waiting_and_last_of_its_job(
    publisher: Publisher, wire: FakeWire
) -> None:
    emitter = JobEmitter(publisher, KEYS, LIMITS, "j", 1)
    await congest(publisher, wire)
    emitter.message(AIMessageChunk(content="a", id="run-1"), POEM)
    emitter.message(AIMessageChunk(content="b", id="run-1"), POEM)
    emitter.update({"node": {"x": 1}})  # a state entry in between: the next chunk starts an entry
    emitter.message(AIMessageChunk(content="c", id="run-1"), POEM)
    emitter.message(AIMessageChunk(content="d", id="run-1"), POEM)
    wire.gate.set()
    await emitter.sink.flushed()  # "c d" taken by the writer: "e" may not join it
    await congest(publisher, wire)
    emitter.message(AIMessageChunk(content="e", id="run-1"), POEM)
    emitter.message(AIMessageChunk(content="f", id="run-1"), POEM)
    job = await written(emitter, wire)
    assert shape(job) == [
        ("token", 0, 2, "ab"), ("update", 2, 1, ""), ("token", 3, 2, "cd"), ("token", 5, 2, "ef"),
    ]  # fmt: skip


USAGE = {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}
TOOL_CALL_CHUNK = {"name": None, "args": '"', "id": None, "index": 0}


@pytest.mark.parametrize(
    ("second", "entries"),
    [
        (AIMessageChunk(content="b", id="run-2"), 2),  # another message: the two of it merge
        (AIMessageChunk(content="b", id="run-1", response_metadata={"finish_reason": "stop"}), 2),
        (AIMessageChunk(content="b", id="run-1", usage_metadata=USAGE), 3),  # usage never merges
        (AIMessageChunk(content="", id="run-1", tool_call_chunks=[TOOL_CALL_CHUNK]), 3),  # nor tool-call chunks
    ],
)
async def test_tokens_whose_data_differs_are_not_merged(
    publisher: Publisher, wire: FakeWire, second: AIMessageChunk, entries: int
) -> None:
    emitter = JobEmitter(publisher, KEYS, LIMITS, "j", 1)
    await congest(publisher, wire)
    emitter.message(AIMessageChunk(content="a", id="run-1"), POEM)
    emitter.message(second, POEM)
    emitter.message(second, POEM)  # twice: equal chunks merge, unless they carry what differs per chunk
    job = await written(emitter, wire)
    assert len(job) == entries
    assert "".join(e.content for e in job) == "a" + 2 * str(second.content)


async def test_tokens_of_another_call_are_not_merged(publisher: Publisher, wire: FakeWire) -> None:
    emitter = JobEmitter(publisher, KEYS, LIMITS, "j", 1)
    await congest(publisher, wire)
    emitter.message(AIMessageChunk(content="a", id="run-1"), POEM)
    emitter.message(AIMessageChunk(content="b", id="run-1"), {**POEM, "langgraph_step": 2})  # another call
    emitter.message(AIMessageChunk(content="c", id="run-1"), {**POEM, "tags": ["joke"]})
    job = await written(emitter, wire)
    assert shape(job) == [("token", 0, 1, "a"), ("token", 1, 1, "b"), ("token", 2, 1, "c")]


async def test_custom_payloads_merge_when_only_their_text_differs(publisher: Publisher, wire: FakeWire) -> None:
    emitter = JobEmitter(publisher, KEYS, LIMITS, "j", 1)
    await congest(publisher, wire)
    payload: dict[str, Any] = {"kind": "joke", "content": "why ", "tags": ["joke"]}
    emitter.custom(payload)
    payload["content"] = "did "  # a writer that reuses its dict: what was written stays written
    emitter.custom(payload)
    emitter.custom({"kind": "joke", "content": "it", "tags": ["joke"]})
    emitter.custom({"kind": "poem", "content": "!", "tags": ["joke"]})  # another key differs
    emitter.custom({"kind": "poem", "content": 7, "tags": ["joke"]})  # content that is no text
    emitter.custom({"kind": "poem", "content": 7, "tags": ["joke"]})
    emitter.custom("plain text")  # not an object
    emitter.custom("plain text")
    job = await written(emitter, wire)
    assert shape(job) == [
        ("custom", 0, 3, "why did it"), ("custom", 3, 1, "!"), ("custom", 4, 1, ""), ("custom", 5, 1, ""),
        ("custom", 6, 1, ""), ("custom", 7, 1, ""),
    ]  # fmt: skip
    assert job[0].data == {"kind": "joke", "content": "why did it", "tags": ["joke"]}
    assert [e.data for e in job[2:]] == [{"kind": "poem", "content": 7, "tags": ["joke"]}] * 2 + ["plain text"] * 2
    assert shape(wire.stream(KEYS.tag("joke"))) == shape(job[:-2])  # (text payloads carry no tags)


async def test_a_merged_entry_takes_no_more_text_past_its_cap(publisher: Publisher, wire: FakeWire) -> None:
    emitter = JobEmitter(publisher, KEYS, LIMITS, "j", 1)
    await congest(publisher, wire)
    word = "x" * 1000
    chunks = MERGE_MAX_CONTENT // len(word) + 3
    for _ in range(chunks):
        emitter.message(AIMessageChunk(content=word, id="run-1"), POEM)
    job = await written(emitter, wire)
    assert len(job) == 2 and len(job[0].content) >= MERGE_MAX_CONTENT > len(job[0].content) - len(word)
    assert (job[1].seq, job[0].n + job[1].n) == (job[0].n, chunks)
    assert "".join(e.content for e in job) == word * chunks


async def test_readers_count_merged_chunks_and_see_a_contiguous_attempt(publisher: Publisher, wire: FakeWire) -> None:
    emitter = JobEmitter(publisher, KEYS, LIMITS, "j", 1)
    emitter.start({})
    await congest(publisher, wire)
    for word in ("a", "b", "c"):
        emitter.message(AIMessageChunk(content=word, id="run-1"), POEM)
    emitter.finish(Outcome())
    job = await written(emitter, wire)
    assert [e.n for e in job] == [1, 3, 1]
    key = emitter.job_key
    for i, e in enumerate(job):
        e.id, e.stream = f"{i + 1}-0", key
    attempts, view = AttemptFilter(job_streams=[key]), JobView("j")
    verdicts = [attempts.accept(e) for e in [job[0], job[1], job[1], job[2]]]  # the merged entry written twice
    assert verdicts == [True, True, False, True]  # no gap: seq 1 + n 3 is the terminal entry's 4
    for e in job:
        view.apply(e)
    assert (view.text, view.chunks, view.missing, view.next_seq, view.complete) == ("abc", 3, 0, 5, True)


def test_a_jump_in_a_job_streams_seqs_is_a_gap_with_the_missing_range() -> None:
    key = KEYS.job("j")

    def at(seq: int, n: int = 1, kind: EntryType = EntryType.TOKEN) -> Entry:
        return Entry(type=kind, job="j", attempt=1, seq=seq, n=n, ts=1, id=f"{seq + 1}-0", stream=key)

    attempts = AttemptFilter(job_streams=[key])
    verdicts = [attempts.accept(e) for e in (at(0, kind=EntryType.START), at(1, 3), at(4), at(9), at(10))]
    assert verdicts[:3] == [True, True, True] and verdicts[4] is True
    gap = verdicts[3]
    assert isinstance(gap, Gap)
    assert (gap.job, gap.attempt, gap.missing, gap.after, gap.first_available) == ("j", 1, (5, 8), "5-0", "10-0")
    assert "seqs 5-8 missing" in str(gap)
    tag_reader = AttemptFilter()  # not told it reads a job stream (tag streams: seqs skip by design)
    assert [tag_reader.accept(at(s)) for s in (1, 5, 9)] == [True, True, True]
