"""Stream entries (contract v1): pydantic models, and their encoding to flat stream fields.

Every entry is a flat map of UTF-8 strings so that any Redis client can read it. JSON-valued
fields (``tags``, ``data``, ``meta``) hold JSON text. The producer's hot path calls
:func:`chunk_fields` with pre-encoded pieces; everything else goes through the models.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, ClassVar, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import MalformedEntry, UnsupportedVersion

CONTRACT_VERSION = "1"
_V = CONTRACT_VERSION.encode()


class EntryType(StrEnum):
    START = "start"
    TOKEN = "token"
    CUSTOM = "custom"
    END = "end"
    ERROR = "error"
    CANCELLED = "cancelled"


CHUNK_TYPES = frozenset({EntryType.TOKEN, EntryType.CUSTOM})
TERMINAL_TYPES = frozenset({EntryType.END, EntryType.ERROR, EntryType.CANCELLED})


class Entry(BaseModel):
    """One stream entry. ``id`` and ``stream`` say where it was read from; they are not fields."""

    model_config = ConfigDict(frozen=True)

    type: EntryType
    job: str
    attempt: int = Field(ge=1)
    seq: int = Field(ge=0)
    ts: int
    tags: tuple[str, ...] = ()
    node: str = ""
    content: str = ""
    data: Any = None
    meta: dict[str, Any] = Field(default_factory=dict)
    error: str = ""
    error_type: str = ""
    retry: bool = False
    """On a terminal entry: another attempt of this job will follow (the worker shut down)."""
    id: str | None = None
    stream: str | None = None

    entry_type: ClassVar[EntryType | None] = None

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    @property
    def is_chunk(self) -> bool:
        return self.type in CHUNK_TYPES

    @property
    def is_final(self) -> bool:
        """A terminal entry after which no attempt of the job will follow."""
        return self.type in TERMINAL_TYPES and not self.retry

    def encode(self) -> dict[bytes, bytes]:
        """The flat stream fields of this entry."""
        fields = chunk_fields(
            self.type,
            self.job,
            self.attempt,
            self.seq,
            self.ts,
            orjson.dumps(self.tags),
            self.node,
            self.content,
            b"" if self.data is None else orjson.dumps(self.data),
            orjson.dumps(self.meta),
        )
        if self.type in TERMINAL_TYPES:
            fields += terminal_fields(self.error, self.error_type, self.retry)
        return dict(zip(fields[::2], fields[1::2], strict=True))

    @classmethod
    def decode(
        cls,
        fields: Mapping[bytes, bytes] | Mapping[str, str],
        *,
        id: str | None = None,
        stream: str | None = None,
    ) -> Entry:
        """Parse stream fields into the entry model of their ``type``.

        Raises :class:`MalformedEntry` (or :class:`UnsupportedVersion`) for anything that is not
        a tokenbus v1 entry, naming what is wrong.
        """
        f = _as_bytes_map(fields)
        version = f.get(b"v")
        if version != _V:
            if version is None:
                raise MalformedEntry(f"not a tokenbus entry (no 'v' field) in {stream or 'stream'} at {id}")
            raise UnsupportedVersion(version.decode(errors="replace"))
        try:
            kind = _TYPES[f[b"type"]]
            terminal = kind in TERMINAL_TYPES
            values: dict[str, Any] = {
                "type": kind,
                "job": f[b"job"].decode(),
                "attempt": int(f[b"attempt"]),
                "seq": int(f[b"seq"]),
                "ts": int(f[b"ts"]),
                "tags": _tags(f.get(b"tags")),
                "node": f.get(b"node", b"").decode(),
                "content": f.get(b"content", b"").decode(),
                "data": orjson.loads(data) if (data := f.get(b"data")) else None,
                "meta": orjson.loads(meta) if (meta := f.get(b"meta")) else {},
                "error": f.get(b"error", b"").decode() if terminal else "",
                "error_type": f.get(b"error_type", b"").decode() if terminal else "",
                "retry": terminal and f.get(b"retry") == b"1",
                "id": id,
                "stream": stream,
            }
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as e:
            raise MalformedEntry(f"bad tokenbus entry in {stream or 'stream'} at {id}: {e!r}") from e
        if values["attempt"] < 1 or values["seq"] < 0 or not isinstance(values["meta"], dict):
            raise MalformedEntry(f"bad tokenbus entry in {stream or 'stream'} at {id}: out-of-range values")
        return _construct(ENTRY_CLASSES[kind], values)


class StartEntry(Entry):
    """First entry of every attempt. ``data``: ``{"graph": ..., "modes": [...]}``."""

    type: Literal[EntryType.START] = EntryType.START


class TokenEntry(Entry):
    """A message chunk from ``stream_mode="messages"``."""

    type: Literal[EntryType.TOKEN] = EntryType.TOKEN


class CustomEntry(Entry):
    """A payload from ``stream_mode="custom"`` (a node's ``writer(...)``)."""

    type: Literal[EntryType.CUSTOM] = EntryType.CUSTOM


class EndEntry(Entry):
    type: Literal[EntryType.END] = EntryType.END


class ErrorEntry(Entry):
    type: Literal[EntryType.ERROR] = EntryType.ERROR


class CancelledEntry(Entry):
    type: Literal[EntryType.CANCELLED] = EntryType.CANCELLED


ENTRY_CLASSES: dict[EntryType, type[Entry]] = {
    EntryType.START: StartEntry,
    EntryType.TOKEN: TokenEntry,
    EntryType.CUSTOM: CustomEntry,
    EntryType.END: EndEntry,
    EntryType.ERROR: ErrorEntry,
    EntryType.CANCELLED: CancelledEntry,
}


def chunk_fields(
    kind: str,
    job: str,
    attempt: int,
    seq: int | object,
    ts: int | object,
    tags_json: bytes,
    node: str,
    content: str | object,
    data_json: bytes | object,
    meta_json: bytes,
) -> list[Any]:
    """The flat field list ``[name, value, ...]`` of an entry, in contract order.

    ``seq``, ``ts``, ``content`` and ``data_json`` are what differs between the chunks of one
    model call: the publisher passes placeholders for them to pack the rest once per call.
    """
    return [
        b"v", _V,
        b"type", kind,
        b"job", job,
        b"attempt", attempt,
        b"seq", seq,
        b"tags", tags_json,
        b"node", node,
        b"content", content,
        b"data", data_json,
        b"meta", meta_json,
        b"ts", ts,
    ]  # fmt: skip


def terminal_fields(error: str, error_type: str, retry: bool) -> list[Any]:
    """Fields only terminal entries carry."""
    fields: list[Any] = []
    if error or error_type:
        fields += [b"error", error, b"error_type", error_type]
    if retry:
        fields += [b"retry", b"1"]
    return fields


_FIELD_NAMES = frozenset(Entry.model_fields)
_TYPES = {t.value.encode(): t for t in EntryType}
_TAGS_CACHE: dict[bytes, tuple[str, ...]] = {}


def _tags(raw: bytes | None) -> tuple[str, ...]:
    """Decode a ``tags`` field; the few distinct values a stream holds are decoded once."""
    if not raw:
        return ()
    tags = _TAGS_CACHE.get(raw)
    if tags is None:
        decoded = orjson.loads(raw)
        if not isinstance(decoded, list) or not all(isinstance(t, str) for t in decoded):
            raise ValueError(f"tags must be a JSON array of strings, not {raw!r:.60}")
        tags = tuple(decoded)
        if len(_TAGS_CACHE) < 4096:
            _TAGS_CACHE[raw] = tags
    return tags


def _construct(cls: type[Entry], values: dict[str, Any]) -> Entry:
    """``cls.model_construct(**values)`` for values already checked and holding every field: the
    consumer's hot path (pydantic's version spends 3 µs per entry looking for defaults)."""
    entry = cls.__new__(cls)
    object.__setattr__(entry, "__dict__", values)
    object.__setattr__(entry, "__pydantic_fields_set__", set(_FIELD_NAMES))
    object.__setattr__(entry, "__pydantic_extra__", None)
    object.__setattr__(entry, "__pydantic_private__", None)
    return entry


def _as_bytes_map(fields: Mapping[bytes, bytes] | Mapping[str, str]) -> Mapping[bytes, bytes]:
    for key in fields:
        if isinstance(key, bytes):
            return fields  # type: ignore[return-value]
        break
    return {str(k).encode(): str(v).encode() for k, v in fields.items()}
