"""The publisher's wire: a chunk template packs exactly what hiredis packs; a batch Redis does not
answer fails after the wire's timeout (real Redis)."""

from __future__ import annotations

import asyncio

import hiredis
import orjson
import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from tests.support import wait_for
from tokenbus.schemas import Entry, EntryType
from tokenbus.schemas.entries import chunk_fields
from tokenbus.worker.wire import CONTENT, DATA, SEQ, TS, Hole, Route, Wire, XaddPacker, describe, slot_of

META = orjson.dumps({"langgraph_node": "call_model", "langgraph_step": 1, "tags": ["poem"], "note": "100% sure"})
STREAMS = [("tokenbus:job:{j1 100%d}", 1000), ("tokenbus:tag:{poem}", 50)]  # a job id may hold "%"


@pytest.mark.parametrize("streams", [STREAMS[:1], STREAMS, [*STREAMS, ("tokenbus:tag:{joke}", 7)]])
def test_a_chunk_template_packs_what_hiredis_packs(streams: list[tuple[str, int]]) -> None:
    packer = XaddPacker()
    template = packer.template(
        streams, chunk_fields(EntryType.TOKEN, "j1", 2, SEQ, TS, b'["poem"]', "call_model", CONTENT, DATA, META)
    )
    long_content, long_data = "é" * 3000, b'"' + b"x" * 5000 + b'"'  # past the cached bulk-string headers
    for seq, content, data in [
        (0, "", b""), (7, " sün %s %d", b'{"id":"run-1"}'), (10**9, "\r\n$3\r\n", b"%"), (4095, long_content, long_data)
    ]:  # fmt: skip
        fields = chunk_fields(
            EntryType.TOKEN, "j1", 2, seq, 1700000000123, b'["poem"]', "call_model", content, data, META
        )
        expected = [hiredis.pack_command(("XADD", key, "MAXLEN", "~", cap, "*", *fields)) for key, cap in streams]
        assert template.pack(seq, content, data, 1700000000123) == b"".join(expected)
        assert template.commands == len(streams)
        assert packer.pack(streams, fields) == expected


@pytest.mark.parametrize("streams", [STREAMS[:1], STREAMS])
def test_a_merged_chunk_packs_its_fields_and_then_its_count(streams: list[tuple[str, int]]) -> None:
    template = XaddPacker().template(
        streams, chunk_fields(EntryType.TOKEN, "j1", 2, SEQ, TS, b'["poem"]', "call_model", CONTENT, DATA, META)
    )
    for n, content in [(2, "ab"), (12345, "é" * 5000)]:
        fields = chunk_fields(EntryType.TOKEN, "j1", 2, 9, 17, b'["poem"]', "call_model", content, b"{}", META)
        expected = [
            hiredis.pack_command(("XADD", key, "MAXLEN", "~", cap, "*", *fields, "n", n)) for key, cap in streams
        ]
        assert template.pack_merged(9, content, b"{}", 17, n) == b"".join(expected)
        reader = hiredis.Reader()
        reader.feed(expected[0])
        assert Entry.decode(reader.gets()[6:]).n == n
    single = chunk_fields(EntryType.TOKEN, "j1", 2, 9, 17, b'["poem"]', "call_model", "ab", b"{}", META)
    packed = [hiredis.pack_command(("XADD", key, "MAXLEN", "~", cap, "*", *single)) for key, cap in streams]
    assert template.pack(9, "ab", b"{}", 17) == b"".join(packed)  # the template still packs single chunks


WIDE = [SEQ, CONTENT, DATA, TS, *(f"f{i}" for i in range(88))]
"""92 fields: a merged command's ``*<count>`` (100) has a digit more than a single chunk's (98)."""


@pytest.mark.parametrize(
    "fields",
    [chunk_fields(EntryType.TOKEN, "j1", 2, SEQ, TS, b'["poem"]', "call_model", CONTENT, DATA, META), WIDE],
    ids=["chunk", "wide"],
)
def test_a_templates_route_cuts_its_single_and_merged_chunks_into_the_command_of_each_stream(
    fields: list[object],
) -> None:
    streams = [*STREAMS, ("tokenbus:tag:{joke}", 7)]
    template = XaddPacker().template(streams, fields)
    keys = [key for key, _ in streams]
    route = Route(keys, template.fixed)  # what the publisher gives the template on a cluster
    slots = [slot_of(key) for key in keys]
    assert len(set(slots)) == 3
    for n, content in [(2, "ab"), (10, "\r\n$3\r\n"), (12345, "é" * 5000)]:
        values: dict[object, object] = {SEQ: 9, CONTENT: content, DATA: b"{}", TS: 17}
        filled = [values[v] if isinstance(v, Hole) else v for v in fields]
        alone = [hiredis.pack_command(("XADD", key, "MAXLEN", "~", cap, "*", *filled)) for key, cap in streams]
        assert route.split(template.pack(9, content, b"{}", 17)) == list(zip(slots, alone, strict=True))
        joined = [hiredis.pack_command(("XADD", key, "MAXLEN", "~", cap, "*", *filled, "n", n)) for key, cap in streams]
        assert route.split(template.pack_merged(9, content, b"{}", 17, n)) == list(zip(slots, joined, strict=True))
    with pytest.raises(ValueError, match="not the 3 commands"):
        route.split(template.pack_merged(9, "ab", b"{}", 17, 2)[:-1])


def test_the_packed_entry_decodes_to_its_values() -> None:
    template = XaddPacker().template(
        STREAMS[:1], chunk_fields(EntryType.CUSTOM, "j1", 1, SEQ, TS, b"[]", "n", CONTENT, DATA, b"{}")
    )
    command = template.pack(3, "hi", b'{"content":"hi"}', 5)
    reader = hiredis.Reader()
    reader.feed(command)
    args = reader.gets()
    fields = dict(zip(args[6::2], args[7::2], strict=True))
    entry = Entry.decode(fields)
    assert (entry.type, entry.seq, entry.content, entry.data, entry.ts) == (
        EntryType.CUSTOM,
        3,
        "hi",
        {"content": "hi"},
        5,
    )


def test_a_refused_command_is_named_by_its_key() -> None:
    packed = b"".join(XaddPacker().pack(STREAMS, chunk_fields(EntryType.END, "j1", 1, 0, 1, b"[]", "", "", b"", b"")))
    assert [describe(packed, i) for i in range(2)] == ["XADD tokenbus:job:{j1 100%d}", "XADD tokenbus:tag:{poem}"]


def test_a_template_needs_its_holes_in_order() -> None:
    fields = chunk_fields(EntryType.TOKEN, "j1", 1, TS, SEQ, b"[]", "", CONTENT, DATA, b"{}")
    with pytest.raises(ValueError, match="holes"):
        XaddPacker().template(STREAMS, fields)


async def test_a_batch_redis_does_not_answer_fails_after_the_timeout_and_the_wire_recovers(redis: Redis) -> None:
    wire = Wire(redis, timeout_s=0.3)
    packed = b"".join(XaddPacker().pack(STREAMS, chunk_fields(EntryType.END, "j1", 1, 0, 1, b"[]", "", "", b"", b"")))
    admin = Redis(connection_pool=redis.connection_pool)
    try:
        assert await wire.execute(packed, 2) == []  # connected, and the watchdog armed
        await admin.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")  # Redis holds every XADD unanswered
        try:
            async with asyncio.timeout(20):
                with pytest.raises(redis_errors.ConnectionError, match=r"no reply within 0\.3s"):
                    await wire.execute(packed, 2)
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
        assert await wire.execute(packed, 2) == []  # a fresh connection
    finally:
        await wire.close()
        await admin.aclose()


async def test_a_cancelled_batch_does_not_lend_its_replies_to_the_next(redis: Redis) -> None:
    """The replies of a batch cancelled in flight must not be counted for the next batch."""
    wire = Wire(redis)
    ok = b"".join(XaddPacker().pack(STREAMS, chunk_fields(EntryType.END, "j1", 1, 0, 1, b"[]", "", "", b"", b"")))
    await redis.set("not-a-stream", "x")
    refused = ok + b"".join(
        XaddPacker().pack([("not-a-stream", 10)], chunk_fields(EntryType.END, "j1", 1, 1, 1, b"[]", "", "", b"", b""))
    )
    admin = Redis(connection_pool=redis.connection_pool)
    try:
        assert await wire.execute(ok, 2) == []
        await admin.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")  # the next batch waits for its replies
        try:
            in_flight = asyncio.create_task(wire.execute(ok, 2))
            await wait_for(lambda: _blocked_on_xadd(admin), what="the batch to reach the paused Redis")
            in_flight.cancel()
            with pytest.raises(asyncio.CancelledError):
                await in_flight
            # the next batch is sent before Redis answers the cancelled one (same loop turn as the UNPAUSE)
            following = asyncio.create_task(wire.execute(refused, 3))
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
        errors = await following  # two XADDs taken, the third refused (WRONGTYPE)
        assert [(index, "WRONGTYPE" in str(error)) for index, error in errors] == [(2, True)]
    finally:
        await wire.close()
        await admin.aclose()


async def _blocked_on_xadd(admin: Redis) -> bool:
    clients: bytes = await admin.execute_command("CLIENT", "LIST")
    return b"cmd=xadd" in clients
