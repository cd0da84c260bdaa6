"""Stream entries (contract v1): the :class:`Entry` type, and its encoding to flat stream fields.

Every entry is a flat map of UTF-8 strings so that any Redis client can read it. JSON-valued
fields (``tags``, ``data``, ``meta``) hold JSON text. The producer's hot path calls
:func:`chunk_fields` with pre-encoded pieces; readers call :meth:`Entry.decode`.

:class:`Entry` is a plain slotted class, not a pydantic model: a reader decodes every entry of
every stream it follows, so decoding checks the fields that say what an entry is (``v``,
``type``, ``job``, ``attempt``, ``seq``...) at once and parses the JSON of ``data`` and ``meta``
on first access only (a consumer of tokens rarely reads them). See BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, ClassVar

import orjson

from tokenbus.schemas.errors import MalformedEntry, UnsupportedVersion

CONTRACT_VERSION = "1"
_V = CONTRACT_VERSION.encode()


class EntryType(StrEnum):
    START = "start"
    TOKEN = "token"
    CUSTOM = "custom"
    UPDATE = "update"
    VALUES = "values"
    END = "end"
    ERROR = "error"
    CANCELLED = "cancelled"


class ErrorType(StrEnum):
    """``error_type`` values of tokenbus's own; others are the graph's exception class names."""

    INVALID_JOB_REQUEST = "InvalidJobRequest"  # the request does not validate
    INVALID_JOB = "InvalidJob"  # an envelope arq cannot run
    JOB_NOT_RUN = "JobNotRun"  # arq failed the job before it ran (max tries, expired)
    JOB_TIMEOUT = "JobTimeout"
    PUBLISH_ERROR = "PublishError"  # entries lost or refused by Redis
    WORKER_LOST = "WorkerLost"  # the attempt's worker stopped without ending it
    LEASE_LOST = "LeaseLost"  # the attempt's worker lost its lease
    CANCELLED = "CancelledError"  # aborted, or the worker shut down


CHUNK_TYPES = frozenset({EntryType.TOKEN, EntryType.CUSTOM})
STATE_TYPES = frozenset({EntryType.UPDATE, EntryType.VALUES})
"""Entries of the graph's state (``updates`` and ``values`` modes): in the job stream only, never chunks."""
TERMINAL_TYPES = frozenset({EntryType.END, EntryType.ERROR, EntryType.CANCELLED})

Fields = Mapping[bytes, bytes] | Mapping[str, str] | list[bytes] | tuple[bytes, ...]
"""Stream fields as a map, or as the flat ``[name, value, ...]`` list Redis replies with."""


class Entry:
    """One stream entry. ``id`` and ``stream`` say where it was read from; they are not fields.

    Entries are values: treat them as read-only. ``data`` and ``meta`` are parsed from JSON when
    first read; a decoded entry whose JSON is broken raises :class:`MalformedEntry` then.
    """

    __slots__ = (
        "_data", "_meta", "attempt", "content", "error", "error_type", "id", "job", "n", "node", "retry", "seq",
        "stream", "tags", "ts", "type",
    )  # fmt: skip

    entry_type: ClassVar[EntryType | None] = None
    """The type of a subclass's entries (``TokenEntry`` → ``token``)."""

    _data: Any  # the raw field (bytes) until parsed
    _meta: dict[str, Any] | bytes
    type: EntryType
    job: str
    attempt: int
    seq: int
    n: int
    """How many chunks the entry holds (``seq`` to ``seq + n - 1``): more than 1 only for chunks a
    congested publisher merged (``TOKENBUS_COALESCE``); the next entry of the attempt has ``seq + n``."""
    ts: int
    tags: tuple[str, ...]
    node: str
    content: str
    error: str
    error_type: str
    retry: bool
    """On a terminal entry: another attempt of this job will follow (the worker shut down)."""
    id: str | None
    stream: str | None

    def __init__(
        self,
        *,
        job: str,
        attempt: int,
        seq: int,
        ts: int,
        type: EntryType | str | None = None,
        tags: Iterable[str] = (),
        node: str = "",
        content: str = "",
        data: Any = None,
        meta: Mapping[str, Any] | None = None,
        error: str = "",
        error_type: str = "",
        retry: bool = False,
        n: int = 1,
        id: str | None = None,
        stream: str | None = None,
    ) -> None:
        kind = EntryType(type) if type is not None else self.entry_type
        if kind is None or (self.entry_type is not None and kind is not self.entry_type):
            raise ValueError(f"{self.__class__.__name__} entries have type {self.entry_type}, not {type}")
        if attempt < 1 or seq < 0 or n < 1:
            raise ValueError(f"attempt counts from 1, seq from 0, n from 1 (got attempt={attempt}, seq={seq}, n={n})")
        if n > 1 and kind not in CHUNK_TYPES:
            raise ValueError(f"only chunks are merged: a {kind} entry holds one (got n={n})")
        self.type, self.job, self.attempt, self.seq, self.n, self.ts = kind, job, attempt, seq, n, ts
        self.tags, self.node, self.content = tuple(tags), node, content
        self._data, self._meta = data, dict(meta or {})
        self.error, self.error_type, self.retry = error, error_type, retry
        self.id, self.stream = id, stream

    # -- the JSON fields, parsed on first access -------------------------------------------------
    @property
    def data(self) -> Any:
        """The custom payload, the message chunk's other parts, a node's output (``update``), the
        state (``values``), or what a lifecycle entry says (``None`` when empty)."""
        data = self._data
        if data.__class__ is bytes:  # still the raw field: JSON never parses to bytes
            data = self._data = _parse(data, "data", self) if data else None
        return data

    @property
    def meta(self) -> dict[str, Any]:
        """LangGraph's metadata of the chunk (``langgraph_node``, ``ls_model_name``, ``tags``...)."""
        meta = self._meta
        if isinstance(meta, dict):
            return meta
        parsed = _parse(meta, "meta", self) if meta else {}
        if not isinstance(parsed, dict):
            raise MalformedEntry(f"bad tokenbus entry in {self.stream or 'stream'} at {self.id}: meta is not an object")
        self._meta = parsed
        return parsed

    # -- what kind of entry ----------------------------------------------------------------------
    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    @property
    def is_chunk(self) -> bool:
        return self.type in CHUNK_TYPES

    @property
    def next_seq(self) -> int:
        """The ``seq`` of the attempt's entry after this one (``seq + n``)."""
        return self.seq + self.n

    @property
    def is_final(self) -> bool:
        """A terminal entry after which no attempt of the job will follow."""
        return self.type in TERMINAL_TYPES and not self.retry

    # -- value semantics -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every contract field plus ``id`` and ``stream``, JSON-ready (``tags`` as a list)."""
        return {
            "type": self.type.value, "job": self.job, "attempt": self.attempt, "seq": self.seq, "n": self.n,
            "ts": self.ts,
            "tags": list(self.tags), "node": self.node, "content": self.content, "data": self.data,
            "meta": self.meta, "error": self.error, "error_type": self.error_type, "retry": self.retry,
            "id": self.id, "stream": self.stream,
        }  # fmt: skip

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable contents (data, meta)

    def __repr__(self) -> str:
        shown = {"job": self.job, "attempt": self.attempt, "seq": self.seq}
        if self.n != 1:
            shown["n"] = self.n
        for name in ("node", "content", "error", "id", "stream"):
            if value := getattr(self, name):
                shown[name] = value
        return f"{self.__class__.__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    # -- wire format -----------------------------------------------------------------------------
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
        if self.n != 1:
            fields += [_N, self.n]
        if self.type in TERMINAL_TYPES:
            fields += terminal_fields(self.error, self.error_type, self.retry)
        return {_bytes(k): _bytes(v) for k, v in zip(fields[::2], fields[1::2], strict=True)}

    @classmethod
    def decode(cls, fields: Fields, *, id: str | None = None, stream: str | None = None) -> Entry:
        """Parse stream fields into the entry class of their ``type``.

        Raises :class:`MalformedEntry` (or :class:`UnsupportedVersion`) for anything that is not
        a tokenbus v1 entry, naming what is wrong.
        """
        terminal: Mapping[bytes, bytes] = _NO_FIELDS
        values: list[Any]  # bytes, or None for a missing field (an error, caught below)
        n: Any = None  # the count of a merged chunk, if the entry has one
        if isinstance(fields, list) and fields[::2] == _FIELD_NAMES:
            # as tokenbus writes entries (and Redis replies): a flat list, in contract order
            values = fields[1::2]
        elif (
            isinstance(fields, list) and len(fields) == _MERGED_LEN and fields[-2] == _N
            and fields[:-2:2] == _FIELD_NAMES
        ):  # fmt: skip
            values, n = fields[1:-2:2], fields[-1]  # a merged chunk, as tokenbus writes it
        else:
            terminal = f = _as_bytes_map(fields)
            values = [f.get(name) for name in _FIELD_NAMES]
            n = f.get(_N)
        version, kind_name, job, attempt, seq, tags, node, content, data, meta, ts = values
        if version != _V:
            if version is None:
                raise MalformedEntry(f"not a tokenbus entry (no 'v' field) in {stream or 'stream'} at {id}")
            raise UnsupportedVersion(version.decode(errors="replace"))
        try:
            kind = _TYPES[kind_name]
            entry = _new(ENTRY_CLASSES[kind])  # decoding skips __init__'s checks: they are made here
            entry.type = kind
            entry.job = job.decode()
            entry.attempt = int(attempt)
            entry.seq = int(seq)
            entry.n = 1 if n is None else int(n)
            entry.ts = int(ts)
            entry.tags = _tags(tags)
            entry.node = node.decode() if node else ""
            entry.content = content.decode() if content else ""
            entry._data = data or b""
            entry._meta = meta or b""
            if kind in TERMINAL_TYPES:
                entry.error = terminal.get(b"error", b"").decode()
                entry.error_type = terminal.get(b"error_type", b"").decode()
                entry.retry = terminal.get(b"retry") == b"1"
            else:
                entry.error = entry.error_type = ""
                entry.retry = False
        except (KeyError, ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:
            required = {"type": kind_name, "job": job, "attempt": attempt, "seq": seq, "ts": ts}
            missing = [name for name, value in required.items() if value is None]
            problem = f"no {', '.join(missing)} field" if missing else repr(e)
            raise MalformedEntry(f"bad tokenbus entry in {stream or 'stream'} at {id}: {problem}") from e
        if entry.attempt < 1 or entry.seq < 0 or entry.n < 1 or (entry.n > 1 and kind not in CHUNK_TYPES):
            raise MalformedEntry(f"bad tokenbus entry in {stream or 'stream'} at {id}: out-of-range values")
        entry.id = id
        entry.stream = stream
        return entry


class StartEntry(Entry):
    """First entry of every attempt. ``data``: ``{"graph": ..., "modes": [...]}``."""

    __slots__ = ()
    entry_type = EntryType.START


class TokenEntry(Entry):
    """A message chunk from ``stream_mode="messages"``."""

    __slots__ = ()
    entry_type = EntryType.TOKEN


class CustomEntry(Entry):
    """A payload from ``stream_mode="custom"`` (a node's ``writer(...)``)."""

    __slots__ = ()
    entry_type = EntryType.CUSTOM


class UpdateEntry(Entry):
    """A node's output from ``stream_mode="updates"``: ``node`` names it, ``data`` is the output
    (JSON by the rules of :mod:`tokenbus.schemas.state`)."""

    __slots__ = ()
    entry_type = EntryType.UPDATE


class ValuesEntry(Entry):
    """The graph's state after a step, from ``stream_mode="values"`` (``data``, JSON by the rules of
    :mod:`tokenbus.schemas.state`)."""

    __slots__ = ()
    entry_type = EntryType.VALUES


class EndEntry(Entry):
    """The attempt ended well. In the job stream ``data["result"]`` is the graph's final state."""

    __slots__ = ()
    entry_type = EntryType.END


class ErrorEntry(Entry):
    __slots__ = ()
    entry_type = EntryType.ERROR


class CancelledEntry(Entry):
    __slots__ = ()
    entry_type = EntryType.CANCELLED


ENTRY_CLASSES: dict[EntryType, type[Entry]] = {
    EntryType.START: StartEntry,
    EntryType.TOKEN: TokenEntry,
    EntryType.CUSTOM: CustomEntry,
    EntryType.UPDATE: UpdateEntry,
    EntryType.VALUES: ValuesEntry,
    EntryType.END: EndEntry,
    EntryType.ERROR: ErrorEntry,
    EntryType.CANCELLED: CancelledEntry,
}
_new = object.__new__


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


REDRIVE_GROUP = "redrive_group"
"""On an entry handed back from the dead-letter stream (``tokenbus dead redrive``): the consumer
group it is for. Other groups and plain readers skip it (they have seen it, or are not owed it)."""
_REDRIVE_GROUP = REDRIVE_GROUP.encode()


def redrive_group(fields: Fields) -> str | None:
    """The consumer group a re-driven entry is for; None for any other entry (cheap for those:
    tokenbus writes every chunk with exactly the contract's fields)."""
    if isinstance(fields, list | tuple):
        if len(fields) <= 2 * len(_FIELD_NAMES):
            return None
        names = fields[::2]
        if _REDRIVE_GROUP not in names:
            return None
        return _bytes(fields[names.index(_REDRIVE_GROUP) * 2 + 1]).decode(errors="replace")
    value = _as_bytes_map(fields).get(_REDRIVE_GROUP)
    return None if value is None else value.decode(errors="replace")


COUNT_FIELD = "n"
"""The field of a merged chunk: how many chunks it holds (absent: 1). It follows ``ts``."""
_N = COUNT_FIELD.encode()
_TYPES = {t.value.encode(): t for t in EntryType}
_FIELD_NAMES = chunk_fields("", "", 1, 0, 0, b"", "", "", b"", b"")[::2]
"""Every entry's field names, in contract order (terminal entries may add more)."""
_MERGED_LEN = 2 * len(_FIELD_NAMES) + 2
_NO_FIELDS: Mapping[bytes, bytes] = {}
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


def _parse(raw: bytes, name: str, entry: Entry) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise MalformedEntry(f"bad tokenbus entry in {entry.stream or 'stream'} at {entry.id}: {name}: {e}") from e


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _as_bytes_map(fields: Fields) -> Mapping[bytes, bytes]:
    if isinstance(fields, list | tuple):  # a flat reply: name, value, name, value...
        it = iter(_bytes(part) for part in fields)
        return dict(zip(it, it, strict=True))
    for key in fields:
        if isinstance(key, bytes):
            return fields  # type: ignore[return-value]
        break
    return {str(k).encode(): str(v).encode() for k, v in fields.items()}
