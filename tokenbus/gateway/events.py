"""The SSE streams of the gateway: a job's entries, or a live tail of tags, resumable by cursor.

Each client gets the exactly-once view a :func:`tokenbus.consumer.subscribe` reader gets (newest
attempt only, each entry once, a ``restart`` event when a newer attempt begins, a ``gap`` event
when a resume point was trimmed), read through the process's :class:`StreamHub`.

Every event that carries an entry has an ``id:``, the client's cursor: the stream id of the entry
for one stream, the ids of every followed stream joined by ``,`` (in the order of the tags asked
for) for several. A reconnect sends it back (``Last-Event-ID``, or ``?since=``) and resumes after
it with no gap and no duplicate.

A client's events are made by a pump task of its own into a bounded :class:`Buffer` that the
response drains, everything pending in one write. A client that does not read its events fills
the buffer: the pump stops, an ``overflow`` event says why, and the connection ends; the client
resumes by its last event's id. So a slow client costs the gateway its buffer and nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from sse_starlette import ServerSentEvent

from tokenbus.consumer.attempts import AttemptFilter, Restart
from tokenbus.consumer.hub import Item, NotAStream, StreamHub
from tokenbus.consumer.output import restart_json
from tokenbus.consumer.reader import BEGINNING, LATEST, Gap, latest_positions
from tokenbus.consumer.subscribe import newest_attempts, prime
from tokenbus.gateway.stats import GatewayStats
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.schemas.errors import MalformedEntry, TokenbusError

logger = logging.getLogger(__name__)

_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")


class BadCursor(TokenbusError, ValueError):
    """A ``Last-Event-ID`` or ``since`` that is not a cursor of the stream it resumes."""


def parse_cursor(cursor: str, streams: int) -> list[str]:
    """The stream ids of a cursor: one per followed stream."""
    ids = cursor.split(",")
    if len(ids) != streams or not all(_STREAM_ID.fullmatch(i) for i in ids):
        raise BadCursor(
            f"resume cursor {cursor[:100]!r} is not {streams} stream id(s) like 1700000000000-0 joined by ','"
        )
    return ids


@dataclass(frozen=True, slots=True)
class Filters:
    """``?node=``, ``?type=`` and ``?tag=``: which entries a client wants. A terminal entry always
    passes (it ends the job), and so do ``restart`` and ``gap`` notices. ``?tag=`` keeps the chunks
    of those tags and the job's ``start``: state entries (``update``, ``values``) carry no tags and
    hold every tag's output, so they do not pass it."""

    nodes: frozenset[str] = frozenset()
    types: frozenset[EntryType] = frozenset()
    tags: frozenset[str] = frozenset()

    def passes(self, entry: Entry) -> bool:
        if entry.is_terminal:
            return True
        if self.types and entry.type not in self.types:
            return False
        if self.nodes and entry.node not in self.nodes:
            return False
        if self.tags:
            return entry.type is EntryType.START or (entry.is_chunk and not self.tags.isdisjoint(entry.tags))
        return True


def _event(event: str, data: bytes, id: str | None = None) -> bytes:
    return ServerSentEvent(data.decode(), event=event, id=id).encode()


def notice_event(kind: str, **fields: Any) -> bytes:
    """A ``gap``, ``overflow`` or ``gateway_error`` event: JSON with ``type`` and the given fields.
    (Not ``error``: that is an entry type, and ``EventSource`` hands an ``error`` event to the same
    listeners as a lost connection.)"""
    return _event(kind, orjson.dumps({"type": kind, **fields}))


def gap_event(gap: Gap) -> bytes:
    """Entries trimmed unread; with ``missing`` ([first, last] ``seq``), a job stream's seq jump."""
    if gap.missing is not None:
        return notice_event(
            "gap", stream=gap.stream, after=gap.after, first_available=gap.first_available, job=gap.job,
            attempt=gap.attempt, missing=list(gap.missing),
        )  # fmt: skip
    return notice_event("gap", stream=gap.stream, after=gap.after, first_available=gap.first_available)


def restart_event(restart: Restart) -> bytes:
    return _event("restart", orjson.dumps(restart_json(restart)))


class Encoded:
    """What the gateway makes of an entry once, for all its clients (kept in :attr:`Item.cache`):
    its JSON, and the whole SSE event of a client that follows the entry's stream alone (its
    ``id:`` is the entry's own id, so every such client is sent the same bytes)."""

    __slots__ = ("event", "json")

    def __init__(self, json: bytes | None) -> None:
        self.json = json
        """None: the entry's ``data`` or ``meta`` is broken; it is skipped."""
        self.event: bytes | None = None


def encoded(item: Item) -> Encoded:
    """The entry's encodings, made on first use."""
    cache = item.cache
    if cache is None:
        assert item.entry is not None
        try:
            # a right-sized copy: orjson does not shrink its output buffer (4-8 KB however short
            # the JSON), and this is kept as long as the hub's window holds the entry
            payload: bytes | None = bytes(memoryview(orjson.dumps(item.entry.to_dict())))
        except MalformedEntry as e:
            logger.warning("skipping entry %s of %s: %s", item.id, item.stream, e)
            payload = None
        cache = item.cache = Encoded(payload)
    assert isinstance(cache, Encoded)
    return cache


class Buffer:
    """What a client has yet to be sent: at most ``limit`` bytes, then it is closed with a reason."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._entries = 0
        self._ready = asyncio.Event()
        self.closed = False
        self.overflowed = False

    def put(self, data: bytes, entries: int = 0) -> bool:
        """Add ``data`` (holding ``entries`` entry events); False once the buffer is closed (the pump stops)."""
        if self.closed:
            return False
        if self._size + len(data) > self._limit and self._parts:
            self.overflowed = True
            self.close(
                notice_event(
                    "overflow",
                    detail=f"the client did not read its events: {self._size} bytes were waiting; "
                    "reconnect with Last-Event-ID to resume",
                )
            )
            return False
        self._parts.append(data)
        self._size += len(data)
        self._entries += entries
        self._ready.set()
        return True

    def close(self, last: bytes = b"") -> None:
        if not self.closed:
            if last:
                self._parts.append(last)
            self.closed = True
            self._ready.set()

    async def take(self) -> tuple[bytes, int] | None:
        """Everything pending and how many entry events it holds, waiting for some; None once
        closed and drained."""
        while not self._parts:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        data, entries = b"".join(self._parts), self._entries
        self._parts, self._size, self._entries = [], 0, 0
        return data, entries


class EventStream:
    """One client's events of some streams: prepared (resume state read) before the response starts."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        hub: StreamHub,
        streams: Sequence[str],
        *,
        filters: Filters,
        cursor: str | None,
        tag_streams: dict[str, str] | None = None,
        job: str | None = None,
        buffer_bytes: int = 1 << 20,
        retry_ms: int = 1000,
        stats: GatewayStats | None = None,
    ) -> None:
        self._redis = redis
        self._stats = stats or GatewayStats()
        self._hub = hub
        self._streams = list(streams)
        self._filters = filters
        self._job = job
        self._attempts = AttemptFilter(tag_streams, job_streams=self._streams if job is not None else ())
        ids = parse_cursor(cursor, len(self._streams)) if cursor else None
        default = BEGINNING if job is not None else LATEST  # a job from its start, tags from now
        self._positions = dict(zip(self._streams, ids or [default] * len(self._streams), strict=True))
        self._resumed = ids is not None
        self._unstarted = job is not None and not self._resumed
        self._buffer = Buffer(buffer_bytes)
        self._retry_ms = retry_ms
        self.ended = False
        """The job's final entry was sent before the cursor: nothing more will come."""

    async def prepare(self) -> None:
        """Read what the client had seen (resumed), or the job's newest attempt (replayed); "from
        now" becomes the streams' newest ids, so the response's first bytes mean it follows."""
        try:
            latest = [s for s, p in self._positions.items() if p == LATEST]
            self._positions.update(await latest_positions(self._redis, latest))
            if self._resumed:
                ended = await prime(self._redis, self._attempts, self._positions)
                self.ended = self._job is not None and self._job in ended
            elif self._job is not None:
                for job, attempt in (await newest_attempts(self._redis, {self._job: self._streams[0]})).items():
                    self._attempts.expect(job, attempt)
        except redis_errors.ResponseError as e:
            if "WRONGTYPE" not in str(e):
                raise
            raise NotAStream(f"{', '.join(self._streams)}: a key of these is not a stream") from e

    async def __aiter__(self) -> AsyncIterator[bytes]:
        stats = self._stats
        pump = asyncio.create_task(self._pump(), name="tokenbus-gateway-pump")
        stats.sse_clients += 1
        stats.sse_connections += 1
        try:
            first = ServerSentEvent(retry=self._retry_ms, comment="tokenbus").encode()
            yield first
            stats.bytes_sent += len(first)  # counted once written: the response resumes this after the send
            while (taken := await self._buffer.take()) is not None:
                data, entries = taken
                yield data
                stats.bytes_sent += len(data)
                stats.entries_sent += entries
        finally:
            stats.sse_clients -= 1
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def _pump(self) -> None:
        buffer = self._buffer
        try:
            async with self._hub.follow(self._positions) as follower:
                cursor = dict(follower.positions)
                while True:
                    for item in await follower.next():
                        if isinstance(item, Gap):
                            if not buffer.put(gap_event(item)):
                                return
                            continue
                        cursor[item.stream] = item.id
                        data, final, entries = self._event(item, cursor)
                        if data and not buffer.put(data, entries):
                            return
                        if final and self._job is not None:  # the job has ended: so does its response
                            buffer.close()
                            return
        except NotAStream as e:
            buffer.close(notice_event("gateway_error", detail=str(e)))
        except Exception as e:
            logger.exception("the event stream of %s failed", ", ".join(self._streams))
            buffer.close(notice_event("gateway_error", detail=f"the gateway failed reading the stream: {e}"))
        finally:
            if buffer.overflowed:
                self._stats.overflows += 1
                logger.warning("disconnecting a client of %s: it did not read its events", ", ".join(self._streams))
            buffer.close()

    def _event(self, item: Item, cursor: dict[str, str]) -> tuple[bytes, bool, int]:
        """The bytes sent for one entry (possibly nothing, or a restart or gap notice first),
        whether it is the final entry of its job (passed on), and whether they hold its event (1)."""
        entry = item.entry
        if entry is None:
            return b"", False, 0
        verdict = self._attempts.accept(entry)
        if not verdict:
            return b"", False, 0
        out = b""
        if isinstance(verdict, Gap):
            out += gap_event(verdict)
        elif verdict is not True:
            out += restart_event(verdict)
        if self._unstarted:
            self._unstarted = False
            if entry.seq != 0:  # the attempt's first entries were trimmed from the job stream
                out += gap_event(Gap(item.stream, BEGINNING, item.id))
        if not self._filters.passes(entry):
            return out, False, 0
        cache = encoded(item)
        if cache.json is None:
            return out, entry.is_final, 0
        if len(cursor) == 1:  # the cursor is the entry's id: the event is the same for every client
            if cache.event is None:
                cache.event = _event(entry.type.value, cache.json, item.id)
            return out + cache.event, entry.is_final, 1
        cursor_id = ",".join(cursor[s] for s in self._streams)
        return out + _event(entry.type.value, cache.json, cursor_id), entry.is_final, 1
