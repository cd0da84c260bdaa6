"""Unit tests of the wire contract: keys, entries, job requests (no Redis)."""

from __future__ import annotations

import orjson
import pytest

from tokenbus.schemas import (
    CustomEntry,
    Entry,
    EntryType,
    ErrorEntry,
    InvalidJobRequest,
    InvalidTag,
    JobRequest,
    MalformedEntry,
    StreamKeys,
    TokenEntry,
    UnsupportedVersion,
    validate_tag,
)


def test_keys_follow_contract_v1() -> None:
    keys = StreamKeys()
    assert keys.tag("poem") == "tokenbus:tag:{poem}"
    assert keys.job("abc-1") == "tokenbus:job:{abc-1}"
    assert StreamKeys("prod.eu").tag("a:b") == "prod.eu:tag:{a:b}"
    with pytest.raises(ValueError, match="invalid prefix"):
        StreamKeys("a b")


@pytest.mark.parametrize("tag", ["poem", "a.b_c:d-e", "x" * 128, "0"])
def test_valid_tags(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize(
    ("tag", "reason"),
    [
        ("", "1 to 128 characters"),
        ("x" * 129, "at most 128 characters, this one has 129"),
        ("po em", "characters ' ' are not allowed"),
        ("{poem}", "characters '{}' are not allowed"),
        ("poème", "characters 'è' are not allowed"),
        (7, "tags are strings, not int"),
    ],
)
def test_invalid_tags_say_why(tag: object, reason: str) -> None:
    with pytest.raises(InvalidTag, match=reason.replace("{", r"\{").replace("}", r"\}")):
        validate_tag(tag)


def test_entry_round_trip_through_flat_fields() -> None:
    entry = TokenEntry(
        job="j1", attempt=2, seq=7, ts=1700000000000, tags=("poem",), node="call_model", content=" sun",
        data={"id": "run-1"}, meta={"langgraph_step": 1, "tags": ["poem"]},
    )  # fmt: skip
    fields = entry.encode()
    assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in fields.items())
    assert fields[b"v"] == b"1" and fields[b"type"] == b"token"
    decoded = Entry.decode(fields, id="1-0", stream="s")
    assert isinstance(decoded, TokenEntry)
    assert decoded.to_dict() | {"id": None, "stream": None} == entry.to_dict()
    assert (decoded.id, decoded.stream) == ("1-0", "s")
    # str-keyed maps (decode_responses=True clients) and flat replies decode the same way
    as_text = {k.decode(): v.decode() for k, v in fields.items()}
    assert Entry.decode(as_text, id="1-0", stream="s") == decoded
    assert Entry.decode([part for pair in fields.items() for part in pair], id="1-0", stream="s") == decoded


def test_json_fields_are_parsed_when_first_read() -> None:
    fields = TokenEntry(job="j", attempt=1, seq=0, ts=1, data={"id": "x"}, meta={"ls_model_name": "m"}).encode()
    entry = Entry.decode(fields | {b"meta": b"{"}, id="5-0", stream="tokenbus:tag:{x}")
    assert entry.data == {"id": "x"} and entry.data is entry.data  # parsed once
    with pytest.raises(MalformedEntry, match=r"tokenbus:tag:\{x\} at 5-0: meta"):
        entry.meta  # noqa: B018
    assert Entry.decode(fields | {b"meta": b"[1]"}).content == ""
    with pytest.raises(MalformedEntry, match="meta is not an object"):
        Entry.decode(fields | {b"meta": b"[1]"}).meta  # noqa: B018


def test_entries_are_built_with_their_type_and_checked() -> None:
    assert TokenEntry(job="j", attempt=1, seq=0, ts=1).type is EntryType.TOKEN
    assert Entry(type="end", job="j", attempt=1, seq=0, ts=1).is_final
    with pytest.raises(ValueError, match="type"):
        TokenEntry(type="end", job="j", attempt=1, seq=0, ts=1)
    with pytest.raises(ValueError, match="attempt counts from 1"):
        TokenEntry(job="j", attempt=0, seq=0, ts=1)
    with pytest.raises(ValueError, match="n from 1"):
        TokenEntry(job="j", attempt=1, seq=0, ts=1, n=0)
    with pytest.raises(ValueError, match="only chunks are merged"):
        Entry(type="end", job="j", attempt=1, seq=0, ts=1, n=2)


def test_a_merged_chunk_carries_n_after_its_fields_and_says_where_the_next_entry_starts() -> None:
    entry = CustomEntry(job="j", attempt=1, seq=4, n=3, ts=1, content="abc", data={"content": "abc"})
    fields = entry.encode()
    assert list(fields)[-1] == b"n" and fields[b"n"] == b"3"
    flat = [part for pair in fields.items() for part in pair]
    as_text = {k.decode(): v.decode() for k, v in fields.items()}
    for form in (fields, flat, as_text):  # as tokenbus writes it (the fast path), and any other way
        decoded = Entry.decode(form, id="1-0", stream="s")
        assert (decoded.seq, decoded.n, decoded.next_seq, decoded.content) == (4, 3, 7, "abc")
    assert Entry.decode(flat[:-2]).n == 1
    assert "n" not in {k.decode() for k in TokenEntry(job="j", attempt=1, seq=0, ts=1).encode()}  # n absent: 1
    assert Entry.decode(fields).to_dict() | {"id": None, "stream": None} == entry.to_dict()


@pytest.mark.parametrize(("kind", "n"), [("token", b"0"), ("token", b"-1"), ("end", b"2"), ("start", b"2")])
def test_a_count_out_of_range_or_on_an_entry_that_is_no_chunk_is_malformed(kind: str, n: bytes) -> None:
    fields = {b"v": b"1", b"type": kind.encode(), b"job": b"j", b"attempt": b"1", b"seq": b"0", b"ts": b"1", b"n": n}
    with pytest.raises(MalformedEntry, match="out-of-range"):
        Entry.decode(fields)


def test_terminal_entries_carry_error_and_retry() -> None:
    entry = ErrorEntry(job="j", attempt=1, seq=3, ts=1, error="boom", error_type="ValueError", retry=True)
    wire = {k: v if isinstance(v, bytes) else str(v).encode() for k, v in entry.encode().items()}
    decoded = Entry.decode(wire)
    assert decoded.is_terminal and not decoded.is_final
    assert (decoded.error, decoded.error_type, decoded.retry) == ("boom", "ValueError", True)


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({b"foo": b"bar"}, MalformedEntry, "no 'v' field"),
        ({b"v": b"2", b"type": b"token"}, UnsupportedVersion, "version '2'"),
        ({b"v": b"1", b"type": b"nope", b"job": b"j"}, MalformedEntry, "bad tokenbus entry"),
        (
            {b"v": b"1", b"type": b"token", b"job": b"j", b"attempt": b"x", b"seq": b"0", b"ts": b"1"},
            MalformedEntry,
            "invalid literal",
        ),
        (
            {b"v": b"1", b"type": b"token", b"job": b"j", b"attempt": b"0", b"seq": b"0", b"ts": b"1"},
            MalformedEntry,
            "out-of-range",
        ),
        (
            {b"v": b"1", b"type": b"token", b"job": b"j", b"attempt": b"1", b"seq": b"0", b"ts": b"1", b"tags": b"{"},
            MalformedEntry,
            "JSONDecodeError",
        ),
    ],
)
def test_malformed_entries_are_rejected(fields: dict[bytes, bytes], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Entry.decode(fields, id="5-0", stream="tokenbus:tag:{x}")


def test_custom_entry_type() -> None:
    entry = CustomEntry(job="j", attempt=1, seq=0, ts=1, data={"content": "hi"}, content="hi")
    assert entry.type is EntryType.CUSTOM and entry.is_chunk


def test_job_request_defaults_and_json_input() -> None:
    request = JobRequest.parse({"graph": "joke_poem", "input": '{"topic": "cats"}'})
    assert request.input == {"topic": "cats"}
    assert request.modes == ("messages", "custom")
    assert request.to_arg() == {"graph": "joke_poem", "input": {"topic": "cats"}}
    assert orjson.loads(orjson.dumps(request.to_arg())) == request.to_arg()


def test_job_request_lists_every_problem() -> None:
    with pytest.raises(InvalidJobRequest) as info:
        JobRequest.parse({"graph": "", "modes": [], "timeout_s": -1, "tags": ["ok", "not ok"]})
    message = str(info.value)
    for part in ["graph:", "modes: at least one stream mode", "timeout_s:", "invalid tag 'not ok'"]:
        assert part in message, message
