"""Graph state as it travels in entries: its JSON-serialisable part, capped in size.

A graph's state and its nodes' outputs hold whatever the graph put there: LangChain messages,
pydantic models, sets, objects with no JSON form at all. ``update`` and ``values`` entries and
the job's ``result`` carry them as JSON by these rules (contract v1, schemas/CONTRACT.md):

- pydantic models (LangChain's messages among them) become their ``model_dump()``; dataclasses,
  dates, UUIDs and enums what orjson makes of them; sets and frozensets lists;
- anything else becomes ``{"__unserializable__": "<module>.<class>"}`` (never its ``repr``, which
  may be huge or hold what should not be published);
- JSON bigger than the cap is never cut into invalid JSON: the largest top-level values of a state
  (an object) are replaced by ``{"__truncated__": <their size in bytes>}`` until it fits, or the
  whole value is when that is not enough (or it is not an object).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import BaseModel

TRUNCATED = "__truncated__"
"""Key of the object that stands for a value left out for size: ``{"__truncated__": <bytes>}``."""
UNSERIALIZABLE = "__unserializable__"
"""Key of the object that stands for a value with no JSON form: ``{"__unserializable__": "<type>"}``."""
DEFAULT_STATE_MAX_BYTES = 64 * 1024
MIN_STATE_MAX_BYTES = 256
"""The smallest cap allowed: room for a marker standing for the whole value."""

_OPTIONS = orjson.OPT_NON_STR_KEYS


def state_json(value: Any, max_bytes: int = DEFAULT_STATE_MAX_BYTES) -> bytes:
    """``value`` as JSON of at most ``max_bytes`` bytes (at least :data:`MIN_STATE_MAX_BYTES`),
    by the rules of this module."""
    if max_bytes < MIN_STATE_MAX_BYTES:
        raise ValueError(f"a state cap must be at least {MIN_STATE_MAX_BYTES} bytes, not {max_bytes}")
    if not isinstance(value, Mapping):
        encoded = _encode(value)
        return encoded if len(encoded) <= max_bytes else _truncated(len(encoded))
    items = [(orjson.dumps(str(key)), _encode(item)) for key, item in value.items()]
    size = whole = _object_size(items)
    if size <= max_bytes:
        return _join(items)
    # leave out the largest values first: the small ones (ids, flags, counts) say the most per byte
    for index in sorted(range(len(items)), key=lambda i: len(items[i][1]), reverse=True):
        key, encoded = items[index]
        marker = _truncated(len(encoded))
        if len(marker) >= len(encoded):
            break  # the rest are smaller than their markers would be
        items[index] = (key, marker)
        size -= len(encoded) - len(marker)
        if size <= max_bytes:
            return _join(items)
    return _truncated(whole)


def _encode(value: Any) -> bytes:
    try:
        return orjson.dumps(value, default=_default, option=_OPTIONS)
    except TypeError:  # a cycle, an integer past 64 bits, nesting deeper than orjson goes
        return orjson.dumps({UNSERIALIZABLE: _type_name(value)})


def _default(value: Any) -> Any:
    """What orjson calls for a value it has no JSON form for."""
    if isinstance(value, BaseModel):
        try:
            return value.model_dump()
        except Exception:  # a model whose serialisation fails: no JSON form either
            return {UNSERIALIZABLE: _type_name(value)}
    if isinstance(value, set | frozenset):
        return list(value)
    return {UNSERIALIZABLE: _type_name(value)}


def _type_name(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _truncated(size: int) -> bytes:
    return orjson.dumps({TRUNCATED: size})


def _object_size(items: list[tuple[bytes, bytes]]) -> int:
    """Bytes of ``{k:v,...}``: braces, a colon per item, commas between them."""
    return 2 + sum(len(k) + 1 + len(v) for k, v in items) + max(len(items) - 1, 0)


def _join(items: list[tuple[bytes, bytes]]) -> bytes:
    return b"{" + b",".join(k + b":" + v for k, v in items) + b"}"
