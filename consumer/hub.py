"""Many followers, shared reads: one process follows streams for many clients at once.

An HTTP gateway holds thousands of SSE connections, many of them on the same streams (forty
browser tabs on one job). Giving each its own :class:`StreamReader` would cost a Redis
connection and a copy of every read per client. The :class:`StreamHub` instead reads every stream
some follower is at the head of with one blocking ``XREAD`` on a connection of its own, decodes
each entry once, and keeps each stream's newest entries in a bounded :class:`_Window`.

A :class:`Follower` holds only its positions. It takes what a window holds after them, or, when it
is behind the window (it resumed from an older id, or it was slow), reads the stream itself with
``XRANGE`` until it reaches the window. So a slow follower costs memory only for the batch it is
sending, a resumed one reads history from Redis as any reader would, and a follower never skips
an entry: a resume point older than what a stream still holds is reported as a :class:`Gap`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from bisect import bisect_right
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

from tokenbus.consumer.reader import (
    BEGINNING,
    LATEST,
    Gap,
    as_text,
    blocking_read_timeout,
    gap_after,
    latest_positions,
    parse_id,
)
from tokenbus.consumer.redis_errors import REDIS_UNAVAILABLE
from tokenbus.consumer.resp import pack
from tokenbus.schemas.entries import Entry, redrive_group
from tokenbus.schemas.errors import MalformedEntry

logger = logging.getLogger(__name__)


class Item:
    """One stream entry as the hub holds it: decoded once, shared by every follower.

    ``entry`` is None for an entry that is not a tokenbus entry (logged once, then passed over).
    ``cache`` is free for the hub's users to keep one encoding of the entry (a gateway's SSE JSON).
    """

    __slots__ = ("cache", "entry", "id", "key", "stream")

    def __init__(self, stream: str, entry_id: str, fields: Any) -> None:
        self.stream = stream
        self.id = entry_id
        self.key = parse_id(entry_id)
        self.cache: Any = None
        try:
            self.entry: Entry | None = Entry.decode(fields, id=entry_id, stream=stream)
            if redrive_group(fields) is not None:
                self.entry = None  # handed back to a consumer group from the dead letters: not new
        except MalformedEntry as e:
            logger.warning("skipping entry %s of %s: %s", entry_id, stream, e)
            self.entry = None


class NotAStream(Exception):
    """A followed key holds something other than a stream: nothing can be read from it."""


class _Window:
    """The newest entries of one stream: everything after ``base`` up to ``last``, at most ``size``."""

    __slots__ = ("base", "error", "items", "keys", "last_id", "refs", "size", "start", "waiters")

    def __init__(self, base_id: str, size: int) -> None:
        self.base = parse_id(base_id)
        self.last_id = base_id
        self.size = size
        self.keys: list[tuple[int, int]] = []
        self.items: list[Item] = []
        self.start = 0  # items before it were dropped (deleted from the lists in bulk, not one by one)
        self.refs = 0
        self.waiters: set[asyncio.Event] = set()
        self.error: NotAStream | None = None

    def covers(self, position: tuple[int, int]) -> bool:
        return position >= self.base

    def after(self, position: tuple[int, int], limit: int) -> list[Item]:
        i = bisect_right(self.keys, position, lo=self.start)
        return self.items[i : i + limit]

    def extend(self, items: Sequence[Item]) -> None:
        last = parse_id(self.last_id)
        new = [item for item in items if item.key > last]  # a read from before a reset may overlap
        if not new:
            return
        self.keys += [item.key for item in new]
        self.items += new
        self.last_id = new[-1].id
        held = len(self.items) - self.start
        if held > self.size:
            self.start += held - self.size
            self.base = self.keys[self.start - 1]
            if self.start > self.size:
                del self.keys[: self.start], self.items[: self.start]
                self.start = 0
        self._wake()

    def fail(self, error: NotAStream) -> None:
        self.error = error
        self._wake()

    def _wake(self) -> None:
        for waiter in self.waiters:
            waiter.set()
        self.waiters.clear()

    def reset(self, base_id: str) -> None:
        """Hold nothing, from ``base_id`` on: followers before it read the stream themselves."""
        self.base, self.last_id = parse_id(base_id), base_id
        self.keys, self.items, self.start = [], [], 0
        self._wake()


class StreamHub:
    """Shared live reads of streams for many :class:`Follower`\\ s in one process.

    ``window`` entries per followed stream are kept; ``batch`` is the most a follower takes at
    once. Run it with ``async with StreamHub(redis) as hub:``; it reads until closed.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        window: int = 2048,
        batch: int = 512,
        block_ms: int = 5000,
        backoff_s: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0),
    ) -> None:
        self._redis = redis
        self._size = window
        self._batch = batch
        self._block_ms = block_ms
        self._backoff_s = tuple(backoff_s)
        self._read_timeout = blocking_read_timeout(redis, block_ms)
        self._windows: dict[str, _Window] = {}
        self._changed = asyncio.Event()  # the set of followed streams changed
        self._conn: AbstractConnection | None = None
        self._conn_id: int | None = None
        self._reading: frozenset[str] | None = None  # the streams of the XREAD in flight
        self._task: asyncio.Task[None] | None = None
        self._kick: asyncio.Task[None] | None = None
        self.reads = 0
        """XREAD replies received (for tests and metrics)."""

    async def __aenter__(self) -> StreamHub:
        self._task = asyncio.create_task(self._run(), name="tokenbus-hub")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for task in (self._kick, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._kick = None
        await self._disconnect()

    @property
    def streams(self) -> int:
        """How many streams are followed."""
        return len(self._windows)

    @contextlib.asynccontextmanager
    async def follow(self, positions: Mapping[str, str]) -> AsyncIterator[Follower]:
        """A follower of ``positions`` (stream → last id seen, ``$`` for "from now", ``0-0`` for
        everything the stream holds), released when the block ends."""
        if not positions:
            raise ValueError("nothing to follow: give at least one stream")
        new = [s for s in positions if s not in self._windows]
        latest = await latest_positions(self._redis, new)
        added = False
        for stream in positions:
            window = self._windows.get(stream)
            if window is None:
                window = self._windows[stream] = _Window(latest[stream], self._size)
                added = True
            window.refs += 1
        if added:
            self._streams_changed()
        resolved = {s: (self._windows[s].last_id if p == LATEST else p) for s, p in positions.items()}
        follower = Follower(self, resolved)
        try:
            yield follower
        finally:
            for stream in positions:
                window = self._windows[stream]
                window.waiters.discard(follower._wake)
                window.refs -= 1
                if window.refs == 0:
                    del self._windows[stream]  # the reader drops it at its next read

    def _streams_changed(self) -> None:
        """Make the reader include new streams now, not when its current XREAD returns."""
        self._changed.set()
        if self._kick is None or self._kick.done():
            self._kick = asyncio.create_task(self._unblock(), name="tokenbus-hub-unblock")

    async def _unblock(self) -> None:
        """``CLIENT UNBLOCK`` the reader's XREAD while it reads an older set of streams. Until Redis
        holds the read blocked (it may still be on its way), the unblock finds nothing to do: try
        again shortly."""
        delay = 0.001
        while self._reading is not None and self._conn_id is not None and set(self._windows) - self._reading:
            try:
                if await self._redis.client_unblock(self._conn_id):
                    return
            except REDIS_UNAVAILABLE:
                return  # the reader reconnects and reads the new set anyway
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _run(self) -> None:
        failures = 0
        while True:
            if all(w.error is not None for w in self._windows.values()):
                self._changed.clear()
                await self._changed.wait()
                continue
            try:
                try:
                    reply = await self._read()
                except redis_errors.ResponseError as e:  # WRONGTYPE: a followed key is not a stream
                    await self._fail_non_streams(e)
                    continue
            except Exception as e:  # Redis unavailable, or a bug: never leave the followers waiting
                await self._disconnect()
                delay = self._backoff_s[min(failures, len(self._backoff_s) - 1)]
                failures += 1
                log = logger.warning if isinstance(e, REDIS_UNAVAILABLE) else logger.exception
                log("the hub's read failed (%s); reading again in %.1fs", e, delay)
                await asyncio.sleep(delay)
                continue
            if failures:
                failures = 0
                await self._restart_windows()
                continue
            self.reads += 1
            for stream_name, entries in reply:
                stream = as_text(stream_name)
                window = self._windows.get(stream)
                if window is not None and entries:
                    window.extend([Item(stream, as_text(entry_id), fields) for entry_id, fields in entries])

    async def _fail_non_streams(self, error: Exception) -> None:
        """Find the followed keys that are not streams (their followers fail); read the rest on."""
        streams = [s for s, w in self._windows.items() if w.error is None]
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.type(stream)
            types = await pipe.execute()
        failed = 0
        for stream, kind in zip(streams, types, strict=True):
            if as_text(kind) not in ("stream", "none"):
                window = self._windows.get(stream)
                if window is not None:
                    window.fail(NotAStream(f"{stream} holds a {as_text(kind)}, not a stream"))
                    failed += 1
        if not failed:
            raise error  # not the keys: a bug, not something to read on through

    async def _read(self) -> list[tuple[Any, list[Any]]]:
        if self._conn is None or not self._conn.is_connected:
            conn = self._redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            assert isinstance(conn, AbstractConnection)
            await conn.connect()  # type: ignore[no-untyped-call]
            await conn.send_command("CLIENT", "ID")
            self._conn, self._conn_id = conn, int(await conn.read_response())
        conn = self._conn
        windows = {s: w for s, w in self._windows.items() if w.error is None}
        self._changed.clear()
        if not windows:  # the followers left (or failed) while connecting
            return []
        self._reading = frozenset(windows)
        try:
            args = [*windows, *(w.last_id for w in windows.values())]
            command = ("XREAD", "COUNT", self._batch, "BLOCK", self._block_ms, "STREAMS", *args)
            await conn.send_packed_command(pack(command), check_health=False)
            reply = await conn.read_response(disable_decoding=True, timeout=self._read_timeout)
        finally:
            self._reading = None
        if reply is None:
            return []
        return list(reply.items()) if isinstance(reply, dict) else list(reply)

    async def _restart_windows(self) -> None:
        """After a failed read: what happened while the hub was not reading is read by each
        follower from Redis (which also tells them if it was trimmed); the windows start again
        from each stream's newest entry."""
        latest = await latest_positions(self._redis, list(self._windows))
        for stream, window in self._windows.items():
            window.reset(latest[stream])

    async def _disconnect(self) -> None:
        self._reading = None
        if self._conn is not None:
            conn, self._conn, self._conn_id = self._conn, None, None
            await conn.disconnect()


class Follower:
    """Reads its streams through a hub, from its own positions (``positions``: stream → last id)."""

    def __init__(self, hub: StreamHub, positions: dict[str, str]) -> None:
        self._hub = hub
        self.positions = positions
        self._wake = asyncio.Event()

    async def next(self) -> list[Item | Gap]:
        """The entries after the follower's positions (and gaps), waiting until there are some.

        Each stream's entries come in order; ``positions`` moves past what is returned."""
        hub = self._hub
        while True:
            out: list[Item | Gap] = []
            behind = []
            for stream, position in self.positions.items():
                window = hub._windows[stream]
                if window.error is not None:
                    raise window.error
                key = parse_id(position)
                if not window.covers(key):
                    behind.append(stream)
                    continue
                items = window.after(key, hub._batch)
                if items:
                    out += items
                    self.positions[stream] = items[-1].id
            if behind:
                out += await self._read_history(behind)
            if out:
                return out
            self._wake.clear()  # nothing: wait for any window to grow (no await since the checks)
            for stream in self.positions:
                hub._windows[stream].waiters.add(self._wake)
            await self._wake.wait()

    async def _read_history(self, streams: list[str]) -> list[Item | Gap]:
        """Read streams the window does not cover from Redis: the entries after each position (up to
        a batch), and whether the stream was trimmed past it."""
        async with self._hub._redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                position = self.positions[stream]
                pipe.xrange(stream, count=1)
                pipe.xrange(stream, min=position if position == BEGINNING else f"({position}", count=self._hub._batch)
            replies = await pipe.execute()
        out: list[Item | Gap] = []
        for i, stream in enumerate(streams):
            first, entries = replies[2 * i], replies[2 * i + 1]
            position = self.positions[stream]
            if position != BEGINNING:
                gap = gap_after(stream, position, as_text(first[0][0]) if first else None)
                if gap is not None:
                    out.append(gap)
            if entries:
                out += [Item(stream, as_text(entry_id), fields) for entry_id, fields in entries]
                self.positions[stream] = as_text(entries[-1][0])
        return out
