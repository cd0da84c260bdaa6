"""The contract's "State" rules (schemas/state.py): JSON always valid, within the cap, every
value that is left out or has no JSON form marked (no Redis)."""

from __future__ import annotations

import dataclasses
import datetime
import uuid
from typing import Any

import orjson
import pytest
from langchain_core.messages import AIMessage, HumanMessage
from pydantic import BaseModel

from tokenbus.schemas import STATE_TYPES, EntryType, UpdateEntry, ValuesEntry
from tokenbus.schemas.entries import Entry
from tokenbus.schemas.state import MIN_STATE_MAX_BYTES, TRUNCATED, UNSERIALIZABLE, state_json


class Opaque:
    """No JSON form, and a repr that must not be published."""

    def __repr__(self) -> str:
        return "secret-token-123"


class Model(BaseModel):
    name: str
    tags: set[str]


@dataclasses.dataclass
class Point:
    x: int
    y: int


def test_json_values_pass_unchanged() -> None:
    state = {"topic": "cats", "n": 3, "ok": True, "none": None, "list": [1, "a", {"b": 2.5}]}
    assert orjson.loads(state_json(state)) == state


def test_messages_and_models_are_their_model_dump() -> None:
    messages = [HumanMessage("hi", id="h1"), AIMessage("hello", id="a1")]
    decoded = orjson.loads(state_json({"messages": messages}))
    assert decoded == {"messages": [orjson.loads(orjson.dumps(m.model_dump())) for m in messages]}
    assert [(m["type"], m["content"], m["id"]) for m in decoded["messages"]] == [
        ("human", "hi", "h1"),
        ("ai", "hello", "a1"),
    ]
    assert orjson.loads(state_json(Model(name="m", tags={"x"}))) == {"name": "m", "tags": ["x"]}


def test_other_known_types_take_orjsons_forms() -> None:
    when, ident = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC), uuid.UUID(int=7)
    decoded = orjson.loads(state_json({"when": when, "id": ident, "p": Point(1, 2), "s": frozenset({1}), 4: "four"}))
    assert decoded == {
        "when": "2024-01-02T03:04:05+00:00",
        "id": str(ident),
        "p": {"x": 1, "y": 2},
        "s": [1],
        "4": "four",
    }


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(Opaque(), f"{__name__}.Opaque"), (b"bytes", "builtins.bytes"), (1 << 70, "builtins.int")],
    ids=["object", "bytes", "big-int"],
)
def test_a_value_with_no_json_form_is_marked_with_its_type_never_its_repr(value: Any, type_name: str) -> None:
    encoded = state_json({"fine": 1, "bad": value, "nested": {"list": [value]}})
    assert b"secret-token" not in encoded
    marker = {UNSERIALIZABLE: type_name}
    if isinstance(value, int):  # orjson gives up on the whole value holding it, not just the number
        assert orjson.loads(encoded) == {"fine": 1, "bad": marker, "nested": {UNSERIALIZABLE: "builtins.dict"}}
    else:
        assert orjson.loads(encoded) == {"fine": 1, "bad": marker, "nested": {"list": [marker]}}


def test_a_cycle_is_marked_not_raised() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    assert orjson.loads(state_json({"a": "kept", "cycle": cycle})) == {
        "a": "kept",
        "cycle": {UNSERIALIZABLE: "builtins.list"},
    }
    assert orjson.loads(state_json(cycle)) == {UNSERIALIZABLE: "builtins.list"}


def test_a_large_state_keeps_its_small_values_and_marks_the_large_ones() -> None:
    state = {"topic": "cats", "big": "x" * 50_000, "bigger": ["y" * 70_000], "n": 1}
    encoded = state_json(state, 64 * 1024)
    assert len(encoded) <= 64 * 1024
    decoded = orjson.loads(encoded)
    assert decoded == {"topic": "cats", "big": "x" * 50_000, "bigger": {TRUNCATED: 70_004}, "n": 1}
    tight = orjson.loads(state_json(state, 1024))
    assert tight == {"topic": "cats", "big": {TRUNCATED: 50_002}, "bigger": {TRUNCATED: 70_004}, "n": 1}


def test_a_value_too_large_even_with_markers_is_replaced_whole() -> None:
    many = {f"key-{i}": i for i in range(1000)}
    size = len(orjson.dumps(many))
    assert orjson.loads(state_json(many, MIN_STATE_MAX_BYTES)) == {TRUNCATED: size}
    text = "z" * 1000
    assert orjson.loads(state_json(text, MIN_STATE_MAX_BYTES)) == {TRUNCATED: 1002}
    assert orjson.loads(state_json([text], MIN_STATE_MAX_BYTES)) == {TRUNCATED: 1004}


@pytest.mark.parametrize("max_bytes", [MIN_STATE_MAX_BYTES, 300, 1000, 5000, 65536])
def test_the_json_is_valid_and_within_the_cap_whatever_the_cap(max_bytes: int) -> None:
    state = {f"k{i}": "v" * (i * 37) for i in range(60)} | {"msgs": [AIMessage("a" * 900)], "o": Opaque()}
    encoded = state_json(state, max_bytes)
    assert len(encoded) <= max_bytes
    orjson.loads(encoded)


def test_a_cap_below_the_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 256 bytes"):
        state_json({}, 100)


def test_state_entries_are_neither_chunks_nor_terminal_and_round_trip() -> None:
    update = UpdateEntry(job="j", attempt=1, seq=3, ts=5, node="answer", data={"messages": []})
    values = ValuesEntry(
        job="j", attempt=1, seq=4, ts=6, data={"topic": "cats"}, meta={"langgraph_checkpoint_ns": "sub:1"}
    )
    assert {update.type, values.type} == STATE_TYPES == {EntryType.UPDATE, EntryType.VALUES}
    for entry in (update, values):
        assert not entry.is_chunk and not entry.is_terminal
        decoded = Entry.decode(entry.encode())
        assert type(decoded) is type(entry) and decoded == entry
