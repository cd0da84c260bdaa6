"""Consumer groups: share a tag stream's entries among consumers, each entry processed and acked.

``XREADGROUP`` hands new entries out; an entry is ``XACK``ed only after the handler returns.
Entries a crashed (or slow) consumer left pending longer than ``claim_idle_ms`` are claimed by
another (``XPENDING ... IDLE`` + ``XCLAIM``, which works on Redis 7.0); an entry delivered
``max_deliveries`` times without success, or that is not a tokenbus entry at all, is moved to
the dead-letter stream (``<prefix>:dead``) and acked, so one poison entry cannot block a group.
So is an entry whose handler raised :class:`MalformedEntry` (its ``data`` or ``meta`` is broken
JSON): delivering it again cannot mend it. A dead letter handed back (:func:`tokenbus.consumer.dead.redrive`)
is appended to its stream again with ``redrive_group``: that group handles it, the others ack it
unhandled.

A chunk carrying the tags of several of the group's streams has a copy in each: the group handles
one. The first copy handed out (to any consumer of the group) claims the chunk in a hash,
``<prefix>:copies:{<job>}:<group>`` (field ``<attempt>:<seq>``, kept ``copies_ttl_s``); the
other copies are acked unhandled. Entries with one followed tag, the usual case, skip this.
Reads block on a client of their own, whatever the given client's ``socket_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection

from tokenbus.consumer._redis_cluster import (
    AnyRedis,
    by_slot,
    connect_to_node,
    is_cluster,
    node_of,
    refresh_topology,
)
from tokenbus.consumer.attempts import AttemptFilter, Restart
from tokenbus.consumer.reader import LATEST, READ_AGAIN, as_text, blocking_read_timeout, stop_task
from tokenbus.schemas.entries import Entry, redrive_group
from tokenbus.schemas.errors import InvalidJobId, MalformedEntry
from tokenbus.schemas.keys import StreamKeys

logger = logging.getLogger(__name__)

Handler = Callable[[Entry], Awaitable[None]]
RestartHandler = Callable[[Restart], Awaitable[None]]


@dataclass(frozen=True)
class GroupStats:
    stream: str
    group: str
    consumers: int
    pending: int
    lag: int | None
    last_delivered: str


class GroupConsumer:
    def __init__(
        self,
        redis: AnyRedis,
        streams: Sequence[str],
        group: str,
        consumer: str,
        *,
        keys: StreamKeys,
        start: str = LATEST,
        block_ms: int = 2000,
        count: int = 256,
        claim_idle_ms: int = 30_000,
        max_deliveries: int = 5,
        copies_ttl_s: int = 86_400,
    ) -> None:
        if not streams:
            raise ValueError("a group consumer needs at least one stream")
        if not group or not consumer:
            raise ValueError("a group consumer needs both a group and a consumer name")
        self._redis = redis
        self.streams = list(streams)
        self.group = group
        self.consumer = consumer
        self._keys = keys
        self._start = start
        self._block_ms = block_ms
        self._count = count
        self._claim_idle_ms = claim_idle_ms
        self._max_deliveries = max_deliveries
        self._copies_ttl_s = copies_ttl_s
        tag_prefix = f"{keys.prefix}:tag:{{"
        self._tags = {s[len(tag_prefix) : -1] for s in self.streams if s.startswith(tag_prefix) and s.endswith("}")}
        self._attempts = AttemptFilter(ordered=False)
        self._on_restart: RestartHandler | None = None
        self.acked = 0
        self.dead = 0
        self.claimed = 0
        self._slot_reads: _SlotReads | None = None  # run()'s reads on a cluster, while it runs

    async def ensure_groups(self) -> None:
        """Create the group on every stream (and the stream itself); an existing group is kept."""
        for stream in self.streams:
            try:
                await self._redis.xgroup_create(stream, self.group, id=self._start, mkstream=True)
            except redis_errors.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def run(
        self, handler: Handler, *, stop: asyncio.Event | None = None, on_restart: RestartHandler | None = None
    ) -> None:
        """Process entries until ``stop`` is set: first this consumer's own pending ones (after a
        restart), then new ones, claiming others' stale ones every ``claim_idle_ms / 2``.
        ``on_restart`` is called before the first entry of a newer attempt of a job this consumer
        has handled entries of (what it did with the older attempt is superseded)."""
        self._on_restart = on_restart
        await self.ensure_groups()
        stop = stop or asyncio.Event()
        redis = self._redis
        reader: Redis | _SlotReads
        if isinstance(redis, Redis):
            reader = _blocking_client(redis, self._block_ms)
        else:
            reader = self._slot_reads = _SlotReads(
                redis, self.streams, self.group, self.consumer, self._count, self._block_ms
            )
        try:
            await self._read(reader, handler, "0")
            next_claim = 0.0
            failures = 0
            while not stop.is_set():
                try:
                    if time.monotonic() >= next_claim:
                        await self.claim_stale(handler)
                        next_claim = time.monotonic() + self._claim_idle_ms / 2000
                    await self._read(reader, handler, ">")
                    failures = 0
                except READ_AGAIN as e:
                    failures += 1
                    delay = min(2.0, 0.1 * 2**failures)
                    logger.warning("group %s consumer %s: %s; retrying in %.1fs", self.group, self.consumer, e, delay)
                    await asyncio.sleep(delay)
                except redis_errors.ResponseError as e:
                    if "NOGROUP" not in str(e):
                        raise
                    logger.warning("group %s vanished from %s; creating it again", self.group, self.streams)
                    await self.ensure_groups()
            if isinstance(reader, _SlotReads):  # the reads under way end within a block: handle what they bring
                for stream, entry_id, fields in await reader.finish():
                    await self._process(handler, stream, entry_id, fields)
        finally:
            if isinstance(reader, _SlotReads):
                self._slot_reads = None
                await reader.close()
            else:
                await reader.aclose(close_connection_pool=True)

    async def _read(self, reader: Redis | _SlotReads, handler: Handler, position: str) -> None:
        if isinstance(reader, _SlotReads):
            for stream, entry_id, fields in await reader.read(position):
                await self._process(handler, stream, entry_id, fields)
            return
        reply = await reader.xreadgroup(
            self.group,
            self.consumer,
            {s: position for s in self.streams},
            count=self._count,
            block=None if position != ">" else self._block_ms,
        )
        for stream_name, entries in reply or ():
            stream = as_text(stream_name)
            for entry_id, fields in entries:
                if fields:  # a pending entry trimmed away comes back with no fields
                    await self._process(handler, stream, as_text(entry_id), fields)

    async def claim_stale(self, handler: Handler) -> int:
        """Take over entries pending longer than ``claim_idle_ms``; dead-letter the hopeless ones."""
        claimed = 0
        for stream in self.streams:
            pending = await self._redis.xpending_range(
                stream, self.group, min="-", max="+", count=self._count, idle=self._claim_idle_ms
            )
            for item in pending:
                entry_id = as_text(item["message_id"])
                if self._slot_reads is not None:
                    self._slot_reads.taken(stream, entry_id)
                if item["times_delivered"] >= self._max_deliveries:
                    entries = await self._redis.xrange(stream, entry_id, entry_id)
                    reason = f"delivered {item['times_delivered']} times without success"
                    await self._dead_letter(stream, entry_id, entries[0][1] if entries else {}, reason)
                    continue
                for claimed_id, fields in await self._redis.xclaim(
                    stream, self.group, self.consumer, self._claim_idle_ms, [entry_id]
                ):
                    if fields:
                        claimed += 1
                        await self._process(handler, stream, as_text(claimed_id), fields)
        self.claimed += claimed
        return claimed

    async def _process(self, handler: Handler, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> None:
        try:
            entry = Entry.decode(fields, id=entry_id, stream=stream)
        except MalformedEntry as e:
            await self._dead_letter(stream, entry_id, fields, str(e))
            return
        redriven = redrive_group(fields)
        if redriven is not None and redriven != self.group:  # handed back to another group
            await self._redis.xack(stream, self.group, entry_id)
            return
        verdict = self._attempts.accept(entry)
        restart = verdict if isinstance(verdict, Restart) else None
        if verdict and redriven is None and len(entry.tags) > 1 and len(self._tags.intersection(entry.tags)) > 1:
            try:
                if not await self._claim_copies(entry, stream, entry_id):
                    verdict = False  # another copy of the chunk is the group's
            except InvalidJobId as e:
                await self._dead_letter(stream, entry_id, fields, str(e))
                return
        try:
            if restart is not None and self._on_restart is not None:
                await self._on_restart(restart)
            if verdict:
                await handler(entry)
        except MalformedEntry as e:  # broken data or meta: no delivery will mend it
            await self._dead_letter(stream, entry_id, fields, str(e))
            return
        except Exception:
            logger.exception(
                "group %s: handler failed on %s %s (job %s); it will be delivered again",
                self.group, stream, entry_id, entry.job,
            )  # fmt: skip
            return
        await self._redis.xack(stream, self.group, entry_id)
        self.acked += 1

    async def _claim_copies(self, entry: Entry, stream: str, entry_id: str) -> bool:
        """Whether this copy of a chunk held by several of the group's streams is the one the
        group handles: the first handed out claims the chunk, and keeps it through redeliveries."""
        key = self._keys.copies(entry.job, self.group)
        chunk, copy = f"{entry.attempt}:{entry.seq}", f"{stream} {entry_id}"
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(key, chunk, copy)
            pipe.hget(key, chunk)
            pipe.expire(key, self._copies_ttl_s)
            _, holder, _ = await pipe.execute()
        return holder is not None and as_text(holder) == copy

    async def _dead_letter(self, stream: str, entry_id: str, fields: dict[Any, Any], reason: str) -> None:
        record = {
            **fields,
            "dead_stream": stream,
            "dead_id": entry_id,
            "dead_group": self.group,
            "dead_reason": reason,
        }
        if is_cluster(self._redis):  # the two keys' slots differ: no transaction; the dead letter
            # first, so a failure between the two leaves the entry pending (dead-lettered again)
            await self._redis.xadd(self._keys.dead_letter, record, maxlen=100_000, approximate=True)
            await self._redis.xack(stream, self.group, entry_id)
        else:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xadd(self._keys.dead_letter, record, maxlen=100_000, approximate=True)
                pipe.xack(stream, self.group, entry_id)
                await pipe.execute()
        self.dead += 1
        logger.warning("group %s: %s %s moved to %s: %s", self.group, stream, entry_id, self._keys.dead_letter, reason)


class _GroupLane:
    __slots__ = ("conn", "delay", "failures", "stale", "started", "streams", "task")

    def __init__(self, streams: list[str]) -> None:
        self.streams = streams
        self.conn: AbstractConnection | None = None
        self.task: asyncio.Task[list[Delivered]] | None = None
        self.failures = 0
        self.delay = 0.0
        self.stale = False
        self.started = 0  # the number of its read in flight (_SlotReads._started then)


Delivered = tuple[str, str, dict[bytes, bytes]]
"""``(stream, id, fields)`` of an entry handed to the consumer."""


class _SlotReads:
    """A group's reads on a Redis Cluster, which refuses ``XREADGROUP`` of keys in several hash
    slots: one read per slot. Blocking reads (``>``) wait on connections of their own to the nodes
    serving the slots, all at once, each going on until it brings entries; a slot that moved or
    lost its node is read again (after a pause) once the cluster says where it is served now.
    Reads of the consumer's own pending entries (``0``) do not block: the client routes them.

    Reading on while the handler works, a slot's read may bring entries that wait (delivered to
    this consumer, pending) longer than ``claim_idle_ms``: the consumer's next claim takes them
    and handles them, so the read that brought them hands them out no more (:meth:`taken`)."""

    def __init__(
        self, redis: RedisCluster, streams: Sequence[str], group: str, consumer: str, count: int, block_ms: int
    ) -> None:
        self._redis = redis
        self._lanes = [_GroupLane(slot) for slot in by_slot(redis, streams)]
        self._group, self._consumer = group, consumer
        self._count, self._block_ms = count, block_ms
        self._read_timeout = blocking_read_timeout(redis, block_ms)
        self._started = 0  # blocking reads started so far
        self._taken: dict[tuple[str, str], int] = {}  # (stream, id) -> reads started when it was taken

    def taken(self, stream: str, entry_id: str) -> None:
        """The consumer claims (or dead-letters) ``entry_id``: a read started before may have
        brought it, and must not hand it out again."""
        if any(lane.task is not None for lane in self._lanes):
            self._taken[(stream, entry_id)] = self._started

    async def read(self, position: str) -> list[Delivered]:
        if position != ">":
            out: list[Delivered] = []
            for lane in self._lanes:
                streams: dict[Any, Any] = {s: position for s in lane.streams}
                reply = await self._redis.xreadgroup(self._group, self._consumer, streams, count=self._count)
                out += _delivered(reply)
            return out
        for lane in self._lanes:
            if lane.task is None:
                lane.task = asyncio.create_task(self._blocking_read(lane))
                lane.started, self._started = self._started, self._started + 1
        await asyncio.wait([lane.task for lane in self._lanes if lane.task], return_when=asyncio.FIRST_COMPLETED)
        return await self._collect(done_only=True)

    async def finish(self) -> list[Delivered]:
        """What the reads under way bring (each ends within its block)."""
        return await self._collect(done_only=False)

    async def _collect(self, *, done_only: bool) -> list[Delivered]:
        out: list[Delivered] = []
        for lane in self._lanes:
            if lane.task is None or (done_only and not lane.task.done()):
                continue
            task, lane.task = lane.task, None
            try:
                delivered = await task
            except READ_AGAIN as e:
                await _drop(lane)
                lane.delay = min(2.0, 0.1 * 2**lane.failures)
                lane.failures += 1
                logger.warning(
                    "group %s: reading %s failed (%s); again in %.1fs", self._group, lane.streams, e, lane.delay
                )
                continue
            lane.failures, lane.delay = 0, 0.0
            out += [d for d in delivered if self._taken.pop((d[0], d[1]), None) is None]
        if self._taken:  # forget what no read in flight can bring any more (started after it was taken)
            oldest = min((lane.started for lane in self._lanes if lane.task is not None), default=self._started)
            self._taken = {key: started for key, started in self._taken.items() if started > oldest}
        return out

    async def _blocking_read(self, lane: _GroupLane) -> list[Delivered]:
        if lane.delay:
            await asyncio.sleep(lane.delay)
        if lane.conn is None or not lane.conn.is_connected:
            if lane.stale:
                await refresh_topology(self._redis)
            lane.conn = await connect_to_node(await node_of(self._redis, lane.streams[0]))
            lane.stale = False
        await lane.conn.send_command(
            "XREADGROUP", "GROUP", self._group, self._consumer, "COUNT", self._count, "BLOCK", self._block_ms,
            "STREAMS", *lane.streams, *[">"] * len(lane.streams),
        )  # fmt: skip
        reply = await lane.conn.read_response(disable_decoding=True, timeout=self._read_timeout)
        return _delivered(reply, raw=True)

    async def close(self) -> None:
        for lane in self._lanes:
            if lane.task is not None:
                task, lane.task = lane.task, None
                await stop_task(task)
            await _drop(lane)


async def _drop(lane: _GroupLane) -> None:
    lane.stale = True
    if lane.conn is not None:
        conn, lane.conn = lane.conn, None
        await conn.disconnect()


def _delivered(reply: Any, *, raw: bool = False) -> list[Delivered]:
    """The entries of an ``XREADGROUP`` reply (RESP2 or RESP3; as redis-py parses it, or ``raw``:
    flat field lists), without the pending ones trimmed away (they come back with no fields)."""
    out: list[Delivered] = []
    for stream_name, entries in reply.items() if isinstance(reply, dict) else reply or ():
        stream = as_text(stream_name)
        for entry_id, fields in entries:
            if fields:
                out.append(
                    (stream, as_text(entry_id), dict(zip(fields[::2], fields[1::2], strict=True)) if raw else fields)
                )
    return out


def _blocking_client(redis: Redis, block_ms: int) -> Redis:
    """A client of its own for ``XREADGROUP BLOCK``, with ``redis``'s connection settings and a read
    timeout above the block: a blocked read neither holds one of ``redis``'s connections nor
    times out while Redis keeps it waiting."""
    pool = redis.connection_pool
    kwargs = {**pool.connection_kwargs, "socket_timeout": blocking_read_timeout(redis, block_ms)}
    return Redis(connection_pool=ConnectionPool(connection_class=pool.connection_class, **kwargs))


async def group_stats(redis: AnyRedis, streams: Sequence[str]) -> list[GroupStats]:
    """Pending and lag of every group on ``streams`` (``lag`` is None where Redis cannot tell)."""
    stats = []
    for stream in streams:
        try:
            groups = await redis.xinfo_groups(stream)
        except redis_errors.ResponseError:
            continue
        for g in groups:
            stats.append(
                GroupStats(
                    stream=stream,
                    group=as_text(g["name"]),
                    consumers=int(g["consumers"]),
                    pending=int(g["pending"]),
                    lag=None if g.get("lag") is None else int(g["lag"]),
                    last_delivered=as_text(g["last-delivered-id"]),
                )
            )
    return stats
