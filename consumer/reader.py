"""The low-level tail loop: XREAD BLOCK over a set of streams, resuming from the last id seen.

Positions are always concrete ids: ``$`` ("from now") is resolved to each stream's last id
before the first read, so no entry added between two reads is skipped, and a reconnect resumes
exactly where reading stopped. A resume id older than what a stream still holds (trimmed by
``MAXLEN``) is reported as a :class:`Gap`, never skipped silently. The position is verified
in the same pipeline as the read that starts from it: on the first read, after a reconnect, and
after every full batch (the reader lags, maybe past the cap).

The reader has its own connection and reads one batch ahead: the next XREAD is sent before a
batch is handed out, so Redis prepares it while the caller works on this one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

from tokenbus.consumer._redis_cluster import (
    REROUTED,
    AnyRedis,
    by_slot,
    connect_to_node,
    connection_settings,
    is_cluster,
    node_of,
    refresh_topology,
)
from tokenbus.consumer.redis_errors import REDIS_UNAVAILABLE
from tokenbus.consumer.resp import pack

logger = logging.getLogger(__name__)

READ_AGAIN: tuple[type[Exception], ...] = (*REDIS_UNAVAILABLE, *REROUTED)
"""Failures a read survives: Redis unreachable, or a cluster's slot served elsewhere now."""

LATEST = "$"
BEGINNING = "0-0"


@dataclass(frozen=True, slots=True)
class Gap:
    """Entries between ``after`` and ``first_available`` were (or may have been) trimmed unread;
    or, with ``missing`` set, a job stream's ``seq`` jumped there: the entries of ``job``'s
    ``attempt`` numbered ``missing`` (first, last) are not in the stream (deleted, or lost before
    Redis kept them: a failover, a publisher that gave up)."""

    stream: str
    after: str
    first_available: str | None
    job: str | None = None
    attempt: int | None = None
    missing: tuple[int, int] | None = None
    type: Literal["gap"] = "gap"

    def __str__(self) -> str:
        if self.missing is not None:
            first, last = self.missing
            seqs = f"seq {first}" if first == last else f"seqs {first}-{last}"
            return (
                f"gap in {self.stream}: job {self.job} attempt {self.attempt}: {seqs} missing "
                f"(between {self.after} and {self.first_available})"
            )
        oldest = self.first_available
        return f"gap in {self.stream}: entries after {self.after} were trimmed (oldest left: {oldest})"


RawEntry = tuple[str, str, list[bytes]]
"""``(stream, id, fields)``, the fields as Redis sends them: ``[name, value, name, value...]``"""


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class _Lane:
    """One ``XREAD`` on one connection: of every stream on a single Redis; of the streams of one
    hash slot on a cluster (which refuses a command naming keys of several slots, even on one node)."""

    __slots__ = ("conn", "delay", "failures", "sent", "stale", "streams", "task", "verify")

    def __init__(self, streams: list[str]) -> None:
        self.streams = streams
        self.conn: AbstractConnection | None = None
        self.verify: list[str] = []  # streams whose position the next read checks for trimming
        self.sent: list[tuple[str, str]] | None = None  # a read on its way, and the positions it checks
        self.task: asyncio.Task[tuple[list[Gap], Any]] | None = None  # its reply awaited (several lanes)
        self.failures = 0
        self.delay = 0.0  # before its next read, after a failure (several lanes)
        self.stale = False  # a cluster's lane failed: ask the cluster where its slot is served now


class StreamReader:
    """Reads new entries from several streams at once, in order per stream.

    It reads on a connection of its own, made with the client's settings (AUTH, database, TLS,
    RESP version), so a blocking XREAD never holds one of the client's; replies are taken as
    Redis sends them (bytes, flat field lists: cheaper than redis-py's dict per entry). Its
    ``BLOCK`` is waited for whatever the client's ``socket_timeout``.

    On a Redis Cluster (a :class:`~redis.asyncio.cluster.RedisCluster` client) the streams are
    read by hash slot: one XREAD per slot, each on its own connection to the node serving it,
    their batches handed out as they come (each stream's entries in order, as on one Redis; across
    streams no order is promised). A slot that moved, or a node lost (its replica takes over),
    makes that slot's read ask the cluster where it is served now and read again from the last id
    seen there, checking that nothing was trimmed meanwhile.
    """

    def __init__(
        self,
        redis: AnyRedis,
        positions: Mapping[str, str],
        *,
        block_ms: int = 5000,
        count: int = 1024,
        backoff_s: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0),
    ) -> None:
        if not positions:
            raise ValueError("nothing to read: give at least one stream")
        self._redis = redis
        self._cluster = redis if is_cluster(redis) else None
        self.positions = dict(positions)
        self._block_ms = block_ms
        self._count = count
        self._backoff_s = tuple(backoff_s)
        self._read_timeout = blocking_read_timeout(redis, block_ms)
        self._lanes: list[_Lane] | None = None  # made by the first read, once ``$`` is resolved

    async def batches(self) -> AsyncGenerator[list[RawEntry] | Gap, None]:
        """Yield lists of new entries (and :class:`Gap` notices) forever; retries through reconnects."""
        failures = 0
        try:
            while True:
                try:
                    if self._lanes is None:
                        await self._resolve()
                    lanes = self._lanes
                    assert lanes is not None
                    if len(lanes) == 1:
                        lane = lanes[0]
                        if lane.sent is None:
                            await self._send_read(lane)
                        gaps, reply = await self._receive(lane)
                    else:
                        lane, gaps, reply = await self._receive_any(lanes)
                except READ_AGAIN as e:
                    for lane in self._lanes or ():
                        await self._reconnect_later(lane)
                    delay = self._backoff_s[min(failures, len(self._backoff_s) - 1)]
                    failures += 1
                    logger.warning("reading %s failed (%s); resuming in %.1fs", ", ".join(self.positions), e, delay)
                    await asyncio.sleep(delay)
                    continue
                failures = 0
                for gap in gaps:
                    yield gap
                batch: list[RawEntry] = []
                for stream_name, entries in _items(reply or ()):
                    stream = as_text(stream_name)  # bytes; str from redis-py 5.0's RESP3 maps
                    if len(entries) >= self._count:  # a full reply: this reader lags, and may lag past the cap
                        lane.verify.append(stream)
                    batch += [(stream, as_text(entry_id), fields) for entry_id, fields in entries]
                    if entries:
                        self.positions[stream] = batch[-1][1]
                if not batch:
                    continue
                try:
                    await self._send_read(lane)  # read ahead while the caller works on this batch
                except READ_AGAIN:
                    await self._reconnect_later(lane)  # the next turn reads again, on a new connection
                yield batch
        finally:
            for lane in self._lanes or ():
                await self._disconnect(lane)

    async def _resolve(self) -> None:
        """Turn ``$`` into concrete ids; explicit resume ids are verified by the first read."""
        latest = [s for s, p in self.positions.items() if p == LATEST]
        self.positions.update(await latest_positions(self._redis, latest))
        groups = [list(self.positions)] if self._cluster is None else by_slot(self._cluster, self.positions)
        self._lanes = [_Lane(streams) for streams in groups]
        for lane in self._lanes:
            lane.verify = [s for s in lane.streams if s not in latest and self.positions[s] != BEGINNING]

    async def _receive_any(self, lanes: list[_Lane]) -> tuple[_Lane, list[Gap], Any]:
        """The next reply of any lane (each reads on, in a task of its own, while others are
        handed out); a lane that fails is read again after a pause, the others go on meanwhile."""
        while True:
            for lane in lanes:
                if lane.task is None:
                    lane.task = asyncio.create_task(self._read_lane(lane, lane.delay))
            done = next((lane for lane in lanes if lane.task is not None and lane.task.done()), None)
            if done is None:
                await asyncio.wait([lane.task for lane in lanes if lane.task], return_when=asyncio.FIRST_COMPLETED)
                continue
            task, done.task = done.task, None
            assert task is not None
            try:
                gaps, reply = task.result()
            except READ_AGAIN as e:
                await self._reconnect_later(done)
                done.delay = self._backoff_s[min(done.failures, len(self._backoff_s) - 1)]
                done.failures += 1
                logger.warning("reading %s failed (%s); resuming in %.1fs", ", ".join(done.streams), e, done.delay)
                continue
            done.failures, done.delay = 0, 0.0
            return done, gaps, reply

    async def _read_lane(self, lane: _Lane, delay: float) -> tuple[list[Gap], Any]:
        if delay:
            await asyncio.sleep(delay)
        if lane.sent is None:
            await self._send_read(lane)
        return await self._receive(lane)

    async def _connect(self, lane: _Lane) -> AbstractConnection:
        if self._cluster is None:
            assert isinstance(self._redis, Redis)
            conn = self._redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            assert isinstance(conn, AbstractConnection)  # TCP, TLS or Unix socket
            await conn.connect()  # type: ignore[no-untyped-call]  # AUTH, SELECT, TLS, RESP3 as configured
            return conn
        if lane.stale:
            await refresh_topology(self._cluster)
        conn = await connect_to_node(await node_of(self._cluster, lane.streams[0]))
        if lane.stale:
            await self._rewind_past_lost(conn, lane)
            lane.stale = False
        return conn

    async def _rewind_past_lost(self, conn: AbstractConnection, lane: _Lane) -> None:
        """After a failover, a stream may end before the last id read (the old master had
        acknowledged entries its replica never got): new entries may then be given ids at or below
        it, so read on from the stream's newest entry instead."""
        streams = [s for s in lane.streams if self.positions[s] != BEGINNING]
        if not streams:
            return
        commands = [("XREVRANGE", stream, "+", "-", "COUNT", 1) for stream in streams]
        await conn.send_packed_command(b"".join(map(pack, commands)), check_health=False)
        for stream in streams:
            newest = await conn.read_response(disable_decoding=True)
            newest_id = as_text(newest[0][0]) if newest else BEGINNING
            if parse_id(newest_id) < parse_id(self.positions[stream]):
                logger.warning(
                    "%s now ends at %s, before %s read from it: entries were lost (a failover); reading on from there",
                    stream, newest_id, self.positions[stream],
                )  # fmt: skip
                self.positions[stream] = newest_id

    async def _send_read(self, lane: _Lane) -> None:
        """Send one ``XREAD`` from the current positions, preceded by the checks of ``verify``
        (each stream's first entry: see :func:`gap_after`)."""
        if lane.conn is None or not lane.conn.is_connected:
            lane.conn = await self._connect(lane)
        positions = self.positions
        checks = [(stream, positions[stream]) for stream in dict.fromkeys(lane.verify)]
        commands: list[tuple[Any, ...]] = [("XRANGE", stream, "-", "+", "COUNT", 1) for stream, _ in checks]
        streams = [*lane.streams, *(positions[s] for s in lane.streams)]
        commands.append(("XREAD", "COUNT", self._count, "BLOCK", self._block_ms, "STREAMS", *streams))
        await lane.conn.send_packed_command(b"".join(map(pack, commands)), check_health=False)
        lane.sent, lane.verify = checks, []

    async def _receive(self, lane: _Lane) -> tuple[list[Gap], Any]:
        """The replies of the read sent last: gaps found by its checks, and the XREAD reply."""
        conn, checks, lane.sent = lane.conn, lane.sent or [], None
        if conn is None:
            raise redis_errors.ConnectionError("the reader's connection was closed")
        gaps = []
        for stream, position in checks:
            first = await conn.read_response(disable_decoding=True)
            gap = gap_after(stream, position, as_text(first[0][0]) if first else None)
            if gap is not None:
                gaps.append(gap)
        return gaps, await conn.read_response(disable_decoding=True, timeout=self._read_timeout)

    async def _reconnect_later(self, lane: _Lane) -> None:
        """Drop the connection after a failure; the first read on the next one verifies every
        position (the streams may have been trimmed past the reader meanwhile)."""
        await self._disconnect(lane)
        lane.verify = [stream for stream in lane.streams if self.positions[stream] != BEGINNING]
        lane.stale = self._cluster is not None

    async def _disconnect(self, lane: _Lane) -> None:
        lane.sent = None
        if lane.task is not None:
            task, lane.task = lane.task, None
            await stop_task(task)
        if lane.conn is not None:
            conn, lane.conn = lane.conn, None
            await conn.disconnect()


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it is done, whatever it raised. The cancel is repeated:
    Python 3.11's ``asyncio.wait_for`` (redis-py sends with it when a ``socket_timeout`` is set)
    swallows a cancel that comes as the write completes. A cancel of the caller meanwhile is
    raised once the task is done (so the task is never left running)."""
    cancelled = False
    while not task.done():
        task.cancel()
        try:
            await asyncio.wait([task], timeout=0.05)
        except asyncio.CancelledError:
            cancelled = True
    if not task.cancelled():
        task.exception()  # retrieved: a failure of a task being stopped is not worth a warning
    if cancelled:
        raise asyncio.CancelledError


def blocking_read_timeout(redis: AnyRedis, block_ms: int) -> float | None:
    """How long to wait for the reply of a command that blocks up to ``block_ms``: the client's
    ``socket_timeout``, raised above the block (redis-py would time out a wait Redis keeps)."""
    socket_timeout = connection_settings(redis).get("socket_timeout")
    return None if socket_timeout is None else max(socket_timeout, block_ms / 1000 + 10)


def gap_after(stream: str, position: str, first_id: str | None) -> Gap | None:
    """Trimming takes the oldest entries first: while the stream starts at or before ``position``
    (the entry there is held, or was deleted one by one), nothing after it was trimmed. If the
    stream now starts later, entries may have stood between the two (Redis 7.0 records no id for
    trimming, so this can be a false alarm: ``position`` may have been the last before ``first_id``)."""
    if first_id is None or parse_id(first_id) <= parse_id(position):
        return None
    return Gap(stream, position, first_id)


async def latest_positions(redis: AnyRedis, streams: Sequence[str]) -> dict[str, str]:
    """The id of each stream's newest entry (``0-0`` for an empty or missing stream): a concrete
    "from now on" position to resume from, unlike ``$``."""
    if not streams:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xrevrange(stream, count=1)
        results = await pipe.execute()
    return {s: as_text(r[0][0]) if r else BEGINNING for s, r in zip(streams, results, strict=True)}


def _items(reply: Any) -> Iterable[tuple[bytes, list[tuple[bytes, list[bytes]]]]]:
    """``(stream, entries)`` pairs of an XREAD reply: a map in RESP3, a list of pairs in RESP2."""
    return reply.items() if isinstance(reply, dict) else reply


def as_text(value: bytes | str) -> str:
    """A reply's string, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else value
