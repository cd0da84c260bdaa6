"""Turns one job attempt's lifecycle and LangGraph chunks into contract v1 entries.

One :class:`JobEmitter` per attempt: it numbers entries (``seq``), writes every entry to the job
stream and a copy of each chunk to the stream of each of its tags, and ends the attempt with one
terminal entry on every stream it wrote to. State entries (``update``, ``values``) and the final
state (``result`` of ``end``) go to the job stream only, as JSON by the contract's State rules.
LangGraph hands the same metadata dict to every chunk of one model call, so the metadata is
encoded once per call, not once per token. While the publisher is congested and coalescing is on,
chunks of one call may be merged into one entry (``worker.coalesce``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from langchain_core.messages import BaseMessageChunk

from tokenbus.schemas.entries import EntryType, chunk_fields, terminal_fields
from tokenbus.schemas.errors import PayloadError
from tokenbus.schemas.keys import FINISHED_KEPT, StreamKeys, validate_tag
from tokenbus.schemas.state import DEFAULT_STATE_MAX_BYTES, state_json
from tokenbus.worker.coalesce import Merge
from tokenbus.worker.publisher import Publisher, Sink
from tokenbus.worker.wire import CONTENT, DATA, SEQ, TS, ChunkTemplate

_EMPTY_JSON_LIST = b"[]"
_EMPTY_JSON_OBJECT = b"{}"


@dataclass(frozen=True, slots=True)
class StreamLimits:
    tag_maxlen: int = 100_000
    job_maxlen: int = 100_000
    job_ttl_s: int = 86_400
    state_max_bytes: int = DEFAULT_STATE_MAX_BYTES
    tag_ttl_s: int | None = None
    """``TOKENBUS_TAG_TTL``: tag streams expire this long after an attempt's first write and its end."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended: its terminal entry."""

    type: EntryType = EntryType.END
    error: str = ""
    error_type: str = ""
    retry: bool = False
    result: bytes | None = None
    """On ``end``: the graph's final state, as JSON (:meth:`JobEmitter.state_json`)."""


class _Meta:
    """One metadata dict (one model call) encoded for one kind of chunk: a packed template."""

    __slots__ = ("kind", "source", "template")

    def __init__(self, kind: EntryType, source: Mapping[str, Any], template: ChunkTemplate):
        self.kind = kind
        self.source = source
        self.template = template


class JobEmitter:
    def __init__(
        self,
        publisher: Publisher,
        keys: StreamKeys,
        limits: StreamLimits,
        job_id: str,
        attempt: int,
    ) -> None:
        self._publisher = publisher
        self._keys = keys
        self._limits = limits
        self.job_id = job_id
        self.attempt = attempt
        self.job_key = keys.job(job_id)
        self._job_stream = (self.job_key, limits.job_maxlen)
        self.sink: Sink = publisher.sink(job_id)
        self.seq = 0
        self._terminal_seq: int | None = None  # the terminal entry's, once queued (see finish)
        # Plain ints, read by the metrics endpoint at scrape time (worker/stats.py): counting a chunk
        # here costs an addition, where a prometheus-client Counter.inc() per token would cost a lock.
        self.tokens = 0
        """``token`` entries queued (``messages`` mode)."""
        self.payloads = 0
        """``custom`` entries queued."""
        self.on_first_chunk: Callable[[], None] | None = None
        """Called once, at the attempt's first chunk (its time to first token)."""
        self.tag_filter: frozenset[str] | None = None
        self.tag_streams: dict[str, None] = {}  # insertion-ordered set of tag stream keys written
        self._unexpiring: list[str] = []  # tag streams of this attempt's next chunk, their expiry not yet set
        self._meta: _Meta | None = None
        self._payload: tuple[Any, tuple[str, ...], ChunkTemplate] | None = None
        self._data: tuple[str | None, dict[str, Any], bytes] | None = None
        self._coalescing = publisher.coalesce_after is not None
        self._merge: Merge | None = None  # the last chunk queued while coalescing, which the next may join

    @property
    def chunks(self) -> int:
        """Chunk entries (``token`` and ``custom``) queued so far."""
        return self.tokens + self.payloads

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, data: Mapping[str, Any]) -> None:
        fields = chunk_fields(
            EntryType.START, self.job_id, self.attempt, self.seq, _now_ms(), _EMPTY_JSON_LIST, "", "",
            orjson.dumps(data), _EMPTY_JSON_OBJECT,
        )  # fmt: skip
        self.seq += 1
        self._publisher.xadd(self.sink, [self._job_stream], fields)

    def finish(self, outcome: Outcome, data: Mapping[str, Any] | None = None) -> None:
        """Queue the attempt's terminal entry on every stream it wrote to, and the job stream's
        expiry. The job stream's copy also carries the outcome's ``result``; the tag streams' do not.

        Queued again (some stream refused or lost it: ``job._write_terminal``), it keeps its
        ``seq``: every stream gets it again, and those that took it already (on a Redis Cluster,
        the nodes with room) hold a copy readers drop, not a second terminal entry."""
        summary = {"chunks": self.chunks, **(data or {})}
        ts, terminal = _now_ms(), terminal_fields(outcome.error, outcome.error_type, outcome.retry)
        if self._terminal_seq is None:
            self._terminal_seq = self.seq
            self.seq += 1
        seq = self._terminal_seq

        def fields(data_json: bytes) -> list[Any]:
            return chunk_fields(
                outcome.type, self.job_id, self.attempt, seq, ts, _EMPTY_JSON_LIST, "", "", data_json,
                _EMPTY_JSON_OBJECT,
            ) + terminal  # fmt: skip

        plain = fields(orjson.dumps(summary))
        tag_streams = [(key, self._limits.tag_maxlen) for key in self.tag_streams]
        if outcome.result is None:
            self._publisher.xadd(self.sink, [self._job_stream, *tag_streams], plain)
        else:
            with_result = fields(orjson.dumps({**summary, "result": orjson.Fragment(outcome.result)}))
            self._publisher.xadd(self.sink, [self._job_stream], with_result)
            if tag_streams:
                self._publisher.xadd(self.sink, tag_streams, plain)
        self._publisher.command(self.sink, ("EXPIRE", self.job_key, self._limits.job_ttl_s))
        if self._limits.tag_ttl_s is not None:
            for key in self.tag_streams:
                self._publisher.command(self.sink, ("EXPIRE", key, self._limits.tag_ttl_s))

    def record_finished(self) -> None:
        """List the job among the newest finished (``<prefix>:finished``), once its final entry
        is written. Queued on a sink of its own: an operator's index that Redis refuses (a worker
        user made before the key existed) fails nothing of the job."""
        record = self._publisher.sink(self.job_id)
        for command in finished_commands(self._keys, self.job_id, _now_ms()):
            self._publisher.command(record, command)

    # -- state (updates and values modes; the job stream only) ------------------------------------
    def state_json(self, value: Any) -> bytes:
        """``value`` as JSON by the contract's State rules, capped at ``TOKENBUS_STATE_MAX_BYTES``."""
        return state_json(value, self._limits.state_max_bytes)

    def update(self, chunk: Any, namespace: tuple[str, ...] = ()) -> None:
        """An ``updates``-mode chunk, ``{node: output}`` (with LangGraph's ``__metadata__`` when
        the output came from its cache): an ``update`` entry per node."""
        if not isinstance(chunk, Mapping):
            self._state(EntryType.UPDATE, "", chunk, namespace, None)
            return
        extra = chunk.get("__metadata__")
        for node, output in chunk.items():
            if node != "__metadata__":
                self._state(EntryType.UPDATE, str(node), output, namespace, extra)

    def values(self, chunk: Any, namespace: tuple[str, ...] = ()) -> None:
        """A ``values``-mode chunk: the state of the graph (of ``namespace``) after a step."""
        self._state(EntryType.VALUES, "", chunk, namespace, None)

    def _state(self, kind: EntryType, node: str, value: Any, namespace: tuple[str, ...], extra: Any) -> None:
        meta: dict[str, Any] = {"langgraph_checkpoint_ns": "|".join(namespace)} if namespace else {}
        if isinstance(extra, Mapping):
            meta.update((str(k), v) for k, v in extra.items())
        fields = chunk_fields(
            kind, self.job_id, self.attempt, self.seq, _now_ms(), _EMPTY_JSON_LIST, node, "", self.state_json(value),
            orjson.dumps(meta, default=repr) if meta else _EMPTY_JSON_OBJECT,
        )  # fmt: skip
        self.seq += 1
        self._publisher.xadd(self.sink, [self._job_stream], fields)

    # -- chunks (the hot path) -------------------------------------------------------------------
    def message(self, message: BaseMessageChunk, metadata: Mapping[str, Any]) -> None:
        """A ``messages``-mode chunk: an LLM token and the metadata of its model call."""
        template = self._template(EntryType.TOKEN, metadata)
        content = message.content if isinstance(message.content, str) else message.text
        data = self._message_data(message)
        self.tokens += 1
        plain = self._coalescing and self._data is not None and data is self._data[2]  # no tool calls, no usage
        self._chunk(template, content, data, None if plain else _UNMERGEABLE)

    def custom(self, chunk: Any, namespace: tuple[str, ...] = ()) -> None:
        """A ``custom``-mode payload. ``(payload, metadata)`` pairs, as in LangGraph's how-to, carry
        their own metadata (and tags); a dict payload may carry ``tags`` itself."""
        metadata: Mapping[str, Any] | None = None
        payload = chunk
        if chunk.__class__ is tuple and len(chunk) == 2 and isinstance(chunk[1], Mapping):
            payload, metadata = chunk
        mapping = isinstance(payload, dict | Mapping)  # dict first: the ABC check is slower
        if metadata is not None:
            template = self._template(EntryType.CUSTOM, metadata)
        else:
            template = self._payload_template(payload.get("tags") if mapping else None, namespace)
        try:
            data = orjson.dumps(payload)
        except TypeError as e:
            node = metadata.get("langgraph_node") if metadata else None
            raise PayloadError(
                f"a custom chunk from node {node or '?'} is not JSON-serialisable ({e}); "
                "write dicts, lists, strings and numbers with writer(...)"
            ) from e
        content = payload.get("content") if mapping else None
        self.payloads += 1
        if content.__class__ is str:
            self._chunk(template, content, data, payload if payload.__class__ is dict else _UNMERGEABLE)
        else:
            self._chunk(template, "", data, _UNMERGEABLE)

    def _chunk(self, template: ChunkTemplate, content: str, data: bytes, payload: Any) -> None:
        """Queue a chunk. ``payload``: a custom chunk's (a dict whose ``content`` is ``content``),
        None for a token, or ``_UNMERGEABLE`` for a chunk no other may join (``worker.coalesce``)."""
        if self.on_first_chunk is not None:
            first, self.on_first_chunk = self.on_first_chunk, None
            first()
        publisher, seq = self._publisher, self.seq
        self.seq += 1
        if self._coalescing and payload is not _UNMERGEABLE and publisher.coalescing:
            self._coalesce(template, seq, content, data, payload)
        else:
            publisher.send(
                self.sink, template.pack(seq, content, data, _now_ms()), template.commands, route=template.route
            )
        if self._unexpiring:
            self._expire_new_tag_streams()

    def _expire_new_tag_streams(self) -> None:
        """Set the expiry of the tag streams this attempt has just written to for the first time
        (after the chunk's XADD, which may have created them: EXPIRE of no key does nothing)."""
        assert self._limits.tag_ttl_s is not None
        for key in self._unexpiring:
            self._publisher.command(self.sink, ("EXPIRE", key, self._limits.tag_ttl_s))
        self._unexpiring.clear()

    def _coalesce(self, template: ChunkTemplate, seq: int, content: str, data: bytes, payload: Any) -> None:
        """Merge the chunk into the job's last entry if that one waits in the buffer and it joins
        without loss; otherwise queue it as an entry later chunks may join."""
        publisher, merge = self._publisher, self._merge
        if (
            merge is not None
            and merge.joins(template, seq, data, payload)
            and publisher.waiting(self.sink, merge.index)
        ):
            publisher.replace(self.sink, merge.index, merge.add(content))
            publisher.chunks_merged += 1
            return
        ts = _now_ms()
        publisher.send(self.sink, template.pack(seq, content, data, ts), template.commands, route=template.route)
        self._merge = Merge(template, self.sink.last_index, seq, content, data, ts, payload is not None)

    def _message_data(self, message: BaseMessageChunk) -> bytes:
        """The ``data`` of a token: usually the call's message id and response metadata alone, the
        same from chunk to chunk of a call (so compared with the last ones, encoded once)."""
        if getattr(message, "tool_call_chunks", None) or getattr(message, "usage_metadata", None):
            return _message_data(message)
        last, response_metadata = self._data, message.response_metadata
        if last is not None and last[0] == message.id and last[1] == response_metadata:
            return last[2]
        data = _message_data(message)
        self._data = (message.id, dict(response_metadata), data)  # a copy: dicts change
        return data

    def _payload_template(self, tags: Any, namespace: tuple[str, ...]) -> ChunkTemplate:
        """The template of a payload that carries no metadata: its tags and the graph namespace
        stand in (the same from chunk to chunk of a writer, so compared with the last ones)."""
        last = self._payload
        if last is not None and last[0] == tags and last[1] == namespace:
            return last[2]
        metadata: dict[str, Any] = {"tags": list(_tags_of(tags))} if tags else {}
        if namespace:
            metadata["langgraph_checkpoint_ns"] = "|".join(namespace)
        template = self._template(EntryType.CUSTOM, metadata)
        self._payload = (list(tags) if isinstance(tags, list) else tags, namespace, template)  # a copy: lists change
        return template

    def _template(self, kind: EntryType, metadata: Mapping[str, Any]) -> ChunkTemplate:
        """The packed template of this call's chunks: LangGraph passes one dict per model call
        (identity), custom writers often build an equal one per chunk (equality), so encoding and
        packing happen once per call."""
        meta = self._meta
        if meta is None or meta.kind is not kind or (metadata is not meta.source and metadata != meta.source):
            meta = self._meta = _Meta(kind, metadata, self._encode(kind, metadata))
        return meta.template

    def _encode(self, kind: EntryType, metadata: Mapping[str, Any]) -> ChunkTemplate:
        tags = tuple(_tags_of(metadata.get("tags")))
        fanout = [t for t in tags if self.tag_filter is None or t in self.tag_filter]
        tag_keys = [self._keys.tag(t) for t in fanout]
        for key in tag_keys:
            if key not in self.tag_streams:
                self.tag_streams[key] = None
                if self._limits.tag_ttl_s is not None:
                    self._unexpiring.append(key)
        fields = chunk_fields(
            kind, self.job_id, self.attempt, SEQ, TS, orjson.dumps(tags) if tags else _EMPTY_JSON_LIST,
            str(metadata.get("langgraph_node", "")), CONTENT, DATA,
            orjson.dumps(metadata, default=repr) if metadata else _EMPTY_JSON_OBJECT,
        )  # fmt: skip
        streams = [self._job_stream, *((key, self._limits.tag_maxlen) for key in tag_keys)]
        return self._publisher.template(streams, fields)


_UNMERGEABLE: Any = object()
"""What a chunk that no other may join passes as its payload (``JobEmitter._chunk``)."""


def _tags_of(value: Any) -> Iterable[str]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise PayloadError(f"chunk tags must be a list of strings, got {value!r}")
    return [validate_tag(t) for t in value]


def _message_data(message: BaseMessageChunk) -> bytes:
    """The chunk's parts other than its text: id, tool-call chunks, usage, finish reason."""
    data: dict[str, Any] = {"id": message.id}
    tool_call_chunks = getattr(message, "tool_call_chunks", None)
    if tool_call_chunks:
        data["tool_call_chunks"] = tool_call_chunks
    usage = getattr(message, "usage_metadata", None)
    if usage:
        data["usage"] = usage
    if message.response_metadata:
        data["response_metadata"] = message.response_metadata
    return orjson.dumps(data, default=repr)


def finished_commands(keys: StreamKeys, job_id: str, ended_ms: int) -> list[tuple[Any, ...]]:
    """What records a job's end in ``<prefix>:finished``, which keeps the newest ``FINISHED_KEPT``."""
    return [
        ("ZADD", keys.finished, ended_ms, job_id),
        ("ZREMRANGEBYRANK", keys.finished, 0, -FINISHED_KEPT - 1),
    ]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
