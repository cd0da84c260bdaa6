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
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection

from tokenbus.consumer._redis_cluster import (
    REROUTED,
    AnyRedis,
    command_on_node,
    connect_to_node,
    node_of,
    refresh_topology,
)
from tokenbus.consumer.reader import (
    BEGINNING,
    LATEST,
    READ_AGAIN,
    Gap,
    as_text,
    blocking_read_timeout,
    gap_after,
    latest_positions,
    parse_id,
    stop_task,
)
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

    On a Redis Cluster (a :class:`~redis.asyncio.cluster.RedisCluster` client), which refuses one
    ``XREAD`` of keys in several hash slots, the hub reads each followed slot with an ``XREAD`` of
    its own, on a connection to the node serving it (so a gateway holds one connection per slot
    its clients follow); a slot that moved or lost its node is read again once the cluster says
    where it is served now.
    """

    def __init__(
        self,
        redis: AnyRedis,
        *,
        window: int = 2048,
        batch: int = 512,
        block_ms: int = 5000,
        backoff_s: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0),
    ) -> None:
        self._redis = redis
        self._cluster = redis if isinstance(redis, RedisCluster) else None
        self._size = window
        self._batch = batch
        self._block_ms = block_ms
        self._backoff_s = tuple(backoff_s)
        self._read_timeout = blocking_read_timeout(redis, block_ms)
        self._windows: dict[str, _Window] = {}
        self._lanes: dict[int | None, _HubLane] = {}  # by hash slot on a cluster; one (None) on a single Redis
        self._closing: set[asyncio.Task[None]] = set()
        self._open = False
        self.reads = 0
        """XREAD replies received (for tests and metrics)."""

    async def __aenter__(self) -> StreamHub:
        self._open = True
        if self._cluster is None:
            self._lanes[None] = _HubLane(self, None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._open = False
        lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            await lane.close()
        for task in list(self._closing):
            await task

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
        try:
            latest = await latest_positions(self._redis, new)
        except redis_errors.ResponseError as e:  # a key that is no stream (WRONGTYPE), as the reads find
            if "WRONGTYPE" not in str(e):
                raise
            raise NotAStream(f"{', '.join(new)}: a key of these is not a stream") from e
        added: set[_HubLane] = set()
        for stream in positions:
            window = self._windows.get(stream)
            if window is None:
                window = self._windows[stream] = _Window(latest[stream], self._size)
                lane = self._lane_of(stream)
                lane.streams.add(stream)
                added.add(lane)
            window.refs += 1
        for lane in added:
            lane.streams_changed()
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
                    self._unfollow(stream)

    def _lane_of(self, stream: str) -> _HubLane:
        slot = None if self._cluster is None else self._cluster.keyslot(stream)
        lane = self._lanes.get(slot)
        if lane is None:
            if not self._open:
                raise RuntimeError("the hub is not running: use it in `async with StreamHub(...)`")
            lane = self._lanes[slot] = _HubLane(self, slot)
        return lane

    def _unfollow(self, stream: str) -> None:
        """On a cluster, a slot nobody follows any more is no longer read (its connection closes)."""
        if self._cluster is None:
            return
        slot = self._cluster.keyslot(stream)
        lane = self._lanes.get(slot)
        if lane is not None:
            lane.streams.discard(stream)
            if not lane.streams:
                del self._lanes[slot]
                task = asyncio.create_task(lane.close(), name="tokenbus-hub-lane-close")
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)


class _HubLane:
    """The hub's blocking ``XREAD`` of some of its streams, on a connection of its own: of every
    followed stream on a single Redis; of the followed streams of one hash slot on a cluster."""

    def __init__(self, hub: StreamHub, slot: int | None) -> None:
        self._hub = hub
        self._slot = slot
        self.streams: set[str] = set()  # on a cluster: the followed streams of its slot
        self._changed = asyncio.Event()  # the set of followed streams changed
        self._conn: AbstractConnection | None = None
        self._conn_id: int | None = None
        self._node: ClusterNode | None = None  # on a cluster: the node it reads from
        self._stale = False  # a cluster's read failed: ask the cluster where the slot is served now
        self._reading: frozenset[str] | None = None  # the streams of the XREAD in flight
        self._kick: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = asyncio.create_task(self._run(), name="tokenbus-hub")

    def windows(self) -> dict[str, _Window]:
        """The windows this lane reads for (every one on a single Redis)."""
        windows = self._hub._windows
        if self._slot is None:
            return windows
        return {s: windows[s] for s in self.streams if s in windows}

    async def close(self) -> None:
        for task in (self._kick, self._task):
            if task is not None:
                await stop_task(task)
        self._task = self._kick = None
        await self._disconnect()

    def streams_changed(self) -> None:
        """Make the reader include new streams now, not when its current XREAD returns."""
        self._changed.set()
        if self._kick is None or self._kick.done():
            self._kick = asyncio.create_task(self._unblock(), name="tokenbus-hub-unblock")

    async def _unblock(self) -> None:
        """``CLIENT UNBLOCK`` the reader's XREAD while it reads an older set of streams. Until Redis
        holds the read blocked (it may still be on its way), the unblock finds nothing to do: try
        again shortly."""
        delay = 0.001
        while self._reading is not None and self._conn_id is not None and set(self.windows()) - self._reading:
            try:
                if await self._client_unblock(self._conn_id):
                    return
            except READ_AGAIN:
                return  # the reader reconnects and reads the new set anyway
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _client_unblock(self, client_id: int) -> bool:
        cluster = self._hub._cluster
        if cluster is None:
            return bool(await self._hub._redis.client_unblock(client_id))
        if self._node is None:
            return False
        return bool(await command_on_node(cluster, self._node, "CLIENT", "UNBLOCK", client_id))

    async def _run(self) -> None:
        hub = self._hub
        failures = 0
        while True:
            if all(w.error is not None for w in self.windows().values()):
                self._changed.clear()
                await self._changed.wait()
                continue
            try:
                try:
                    reply = await self._read()
                except redis_errors.ResponseError as e:  # WRONGTYPE: a followed key is not a stream
                    if isinstance(e, REROUTED):
                        raise  # a cluster's slot served elsewhere now
                    await self._fail_non_streams(e)
                    continue
            except Exception as e:  # Redis unavailable, or a bug: never leave the followers waiting
                await self._disconnect()
                self._stale = hub._cluster is not None
                delay = hub._backoff_s[min(failures, len(hub._backoff_s) - 1)]
                failures += 1
                log = logger.warning if isinstance(e, READ_AGAIN) else logger.exception
                log("the hub's read failed (%s); reading again in %.1fs", e, delay)
                await asyncio.sleep(delay)
                continue
            if failures:
                try:
                    await self._restart_windows()
                except Exception as e:  # Redis away again: never leave the followers waiting
                    delay = hub._backoff_s[min(failures, len(hub._backoff_s) - 1)]
                    logger.warning("the hub's read failed (%s); reading again in %.1fs", e, delay)
                    await asyncio.sleep(delay)
                    continue
                failures = 0
                continue
            hub.reads += 1
            for stream_name, entries in reply:
                stream = as_text(stream_name)
                window = hub._windows.get(stream)
                if window is not None and entries:
                    window.extend([Item(stream, as_text(entry_id), fields) for entry_id, fields in entries])

    async def _fail_non_streams(self, error: Exception) -> None:
        """Find the followed keys that are not streams (their followers fail); read the rest on."""
        streams = [s for s, w in self.windows().items() if w.error is None]
        async with self._hub._redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.type(stream)
            types = await pipe.execute()
        failed = 0
        for stream, kind in zip(streams, types, strict=True):
            if as_text(kind) not in ("stream", "none"):
                window = self._hub._windows.get(stream)
                if window is not None:
                    window.fail(NotAStream(f"{stream} holds a {as_text(kind)}, not a stream"))
                    failed += 1
        if not failed:
            raise error  # not the keys: a bug, not something to read on through

    async def _connect(self, stream: str) -> AbstractConnection:
        cluster = self._hub._cluster
        if cluster is None:
            assert isinstance(self._hub._redis, Redis)
            conn = self._hub._redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            assert isinstance(conn, AbstractConnection)
            await conn.connect()  # type: ignore[no-untyped-call]
            return conn
        if self._stale:
            await refresh_topology(cluster)
            self._stale = False
        self._node = await node_of(cluster, stream)
        return await connect_to_node(self._node)

    async def _read(self) -> list[tuple[Any, list[Any]]]:
        windows = {s: w for s, w in self.windows().items() if w.error is None}
        if not windows:  # the followers left (or failed)
            self._changed.clear()
            return []
        if self._conn is None or not self._conn.is_connected:
            conn = await self._connect(next(iter(windows)))
            await conn.send_command("CLIENT", "ID")
            self._conn, self._conn_id = conn, int(await conn.read_response())
        conn = self._conn
        windows = {s: w for s, w in self.windows().items() if w.error is None}
        self._changed.clear()
        if not windows:  # the followers left (or failed) while connecting
            return []
        self._reading = frozenset(windows)
        try:
            args = [*windows, *(w.last_id for w in windows.values())]
            command = ("XREAD", "COUNT", self._hub._batch, "BLOCK", self._hub._block_ms, "STREAMS", *args)
            await conn.send_packed_command(pack(command), check_health=False)
            reply = await conn.read_response(disable_decoding=True, timeout=self._hub._read_timeout)
        finally:
            self._reading = None
        if reply is None:
            return []
        return list(reply.items()) if isinstance(reply, dict) else list(reply)

    async def _restart_windows(self) -> None:
        """After a failed read: what happened while the hub was not reading is read by each
        follower from Redis (which also tells them if it was trimmed); the windows start again
        from each stream's newest entry."""
        windows = {s: w for s, w in self.windows().items() if w.error is None}
        try:
            latest = await latest_positions(self._hub._redis, list(windows))
        except redis_errors.ResponseError as e:
            if isinstance(e, REROUTED) or "WRONGTYPE" not in str(e):
                raise
            await self._fail_non_streams(e)  # a key became something else meanwhile: its followers fail
            return await self._restart_windows()
        for stream, window in windows.items():
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
