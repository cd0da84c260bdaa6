"""One attempt's entries as the emitter writes them: numbering, fan-out to tag streams, the terminal
entry; through a real publisher on a fake connection."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessageChunk

from tests.unit.fake_wire import FakeWire
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.schemas.errors import InvalidTag, PayloadError
from tokenbus.schemas.keys import StreamKeys
from tokenbus.worker.emitter import JobEmitter, Outcome, StreamLimits
from tokenbus.worker.publisher import Publisher

KEYS = StreamKeys("t")
LIMITS = StreamLimits(tag_maxlen=10, job_maxlen=20, job_ttl_s=60)
POEM = {"langgraph_node": "write_poem", "tags": ["poem"], "ls_model_name": "m"}


def emitter_for(publisher: Publisher, attempt: int = 1) -> JobEmitter:
    return JobEmitter(publisher, KEYS, LIMITS, "j", attempt)


def seqs(entries: list[Entry]) -> list[tuple[str, int]]:
    return [(e.type.value, e.seq) for e in entries]


async def test_an_attempt_is_numbered_from_start_to_its_terminal_entry_on_every_stream_it_wrote_to(
    publisher: Publisher, wire: FakeWire
) -> None:
    emitter = emitter_for(publisher, attempt=2)
    emitter.start({"graph": "g"})
    for word in ("a ", "b ", "c"):
        emitter.message(AIMessageChunk(content=word, id="run-1"), POEM)
    emitter.custom({"content": "ha", "tags": ["joke"]})
    emitter.finish(Outcome())
    await emitter.sink.flushed()

    job = wire.stream(KEYS.job("j"))
    assert seqs(job) == [("start", 0), ("token", 1), ("token", 2), ("token", 3), ("custom", 4), ("end", 5)]
    assert {e.attempt for e in job} == {2}
    assert seqs(wire.stream(KEYS.tag("poem"))) == [("token", 1), ("token", 2), ("token", 3), ("end", 5)]
    assert seqs(wire.stream(KEYS.tag("joke"))) == [("custom", 4), ("end", 5)]
    assert "".join(e.content for e in job if e.is_chunk) == "a b cha"
    token = job[1]
    assert (token.node, token.tags, token.meta, token.data) == ("write_poem", ("poem",), POEM, {"id": "run-1"})
    assert (job[0].data, job[-1].data) == ({"graph": "g"}, {"chunks": 4})
    assert wire.commands[-1] == [b"EXPIRE", KEYS.job("j").encode(), b"60"]  # after the terminal entries
    maxlens = {(c[1].decode(), int(c[4])) for c in wire.commands if c[0] == b"XADD"}
    assert maxlens == {(KEYS.job("j"), 20), (KEYS.tag("poem"), 10), (KEYS.tag("joke"), 10)}


async def test_tag_streams_expire_after_each_attempts_first_write_to_them_and_its_end(
    publisher: Publisher, wire: FakeWire
) -> None:
    emitter = JobEmitter(publisher, KEYS, StreamLimits(tag_ttl_s=900), "j", 1)
    emitter.start({})
    for word in ("a", "b"):
        emitter.message(AIMessageChunk(content=word, id="run-1"), POEM)
    emitter.custom({"content": "ha", "tags": ["joke", "poem"]})
    emitter.finish(Outcome())
    await emitter.sink.flushed()

    poem, joke = KEYS.tag("poem").encode(), KEYS.tag("joke").encode()
    shape = [(c[0], c[1]) for c in wire.commands if c[0] in (b"XADD", b"EXPIRE") and c[1] != KEYS.job("j").encode()]
    assert shape == [
        (b"XADD", poem), (b"EXPIRE", poem),  # created by the first chunk, then given its expiry
        (b"XADD", poem),  # no EXPIRE per chunk
        (b"XADD", joke), (b"XADD", poem), (b"EXPIRE", joke),  # a stream new to the attempt
        (b"XADD", poem), (b"XADD", joke), (b"EXPIRE", poem), (b"EXPIRE", joke),  # the end: refreshed
    ]  # fmt: skip
    assert {int(c[2]) for c in wire.commands if c[0] == b"EXPIRE" and c[1] in (poem, joke)} == {900}


async def test_without_a_tag_ttl_tag_streams_never_expire(publisher: Publisher, wire: FakeWire) -> None:
    emitter = emitter_for(publisher)
    emitter.start({})
    emitter.message(AIMessageChunk(content="a"), POEM)
    emitter.finish(Outcome())
    await emitter.sink.flushed()
    assert [c[1] for c in wire.commands if c[0] == b"EXPIRE"] == [KEYS.job("j").encode()]


async def test_a_failed_attempt_ends_with_its_error_and_whether_another_follows(
    publisher: Publisher, wire: FakeWire
) -> None:
    emitter = emitter_for(publisher)
    emitter.start({})
    emitter.message(AIMessageChunk(content="x"), POEM)
    emitter.finish(Outcome(EntryType.ERROR, "boom", "ValueError", retry=True))
    await emitter.sink.flushed()
    for key in (KEYS.job("j"), KEYS.tag("poem")):
        last = wire.stream(key)[-1]
        assert (last.type, last.seq, last.error, last.error_type, last.retry) == (
            EntryType.ERROR, 2, "boom", "ValueError", True,
        )  # fmt: skip
        assert not last.is_final


async def test_a_jobs_tag_filter_limits_the_fan_out_not_the_job_stream(publisher: Publisher, wire: FakeWire) -> None:
    emitter = emitter_for(publisher)
    emitter.tag_filter = frozenset({"poem"})
    emitter.message(AIMessageChunk(content="both"), {**POEM, "tags": ["joke", "poem"]})
    emitter.custom({"content": "joke only", "tags": ["joke"]})
    emitter.finish(Outcome())
    await emitter.sink.flushed()
    assert seqs(wire.stream(KEYS.job("j"))) == [("token", 0), ("custom", 1), ("end", 2)]
    assert wire.stream(KEYS.job("j"))[0].tags == ("joke", "poem")
    assert seqs(wire.stream(KEYS.tag("poem"))) == [("token", 0), ("end", 2)]
    assert wire.stream(KEYS.tag("joke")) == []


async def test_custom_payloads_take_their_tags_from_metadata_or_from_the_payload(
    publisher: Publisher, wire: FakeWire
) -> None:
    emitter = emitter_for(publisher)
    emitter.custom(({"content": "from the how-to"}, {"langgraph_node": "n", "tags": ["poem"]}))
    emitter.custom({"content": 42, "tags": ["poem"]})  # content that is not a string is not content
    emitter.custom("untagged", namespace=("sub:1",))
    emitter.finish(Outcome())
    await emitter.sink.flushed()
    job = wire.stream(KEYS.job("j"))
    assert [(e.content, e.data, e.tags) for e in job[:3]] == [
        ("from the how-to", {"content": "from the how-to"}, ("poem",)),
        ("", {"content": 42, "tags": ["poem"]}, ("poem",)),
        ("", "untagged", ()),
    ]
    assert (job[0].node, job[2].meta) == ("n", {"langgraph_checkpoint_ns": "sub:1"})
    assert seqs(wire.stream(KEYS.tag("poem"))) == [("custom", 0), ("custom", 1), ("end", 3)]


async def test_a_chunk_that_cannot_be_encoded_raises_and_is_not_written(publisher: Publisher, wire: FakeWire) -> None:
    emitter = emitter_for(publisher)
    with pytest.raises(PayloadError, match="from node write_poem is not JSON-serialisable"):
        emitter.custom(({"content": object()}, POEM))
    with pytest.raises(PayloadError, match="chunk tags must be a list of strings"):
        emitter.custom(({"content": "x"}, {"tags": "poem"}))
    with pytest.raises(PayloadError, match="chunk tags must be a list of strings"):  # not tags p, o, e, m
        emitter.custom({"content": "x", "tags": "poem"})
    with pytest.raises(PayloadError, match="chunk tags must be a list of strings"):
        emitter.custom({"content": "x", "tags": 7})
    with pytest.raises(InvalidTag):
        emitter.message(AIMessageChunk(content="x"), {"tags": ["no spaces"]})
    emitter.finish(Outcome())
    await emitter.sink.flushed()
    assert seqs(wire.stream(KEYS.job("j"))) == [("end", 0)]
