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

from tokenbus.consumer.redis_errors import REDIS_UNAVAILABLE
from tokenbus.consumer.resp import pack

logger = logging.getLogger(__name__)

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


class StreamReader:
    """Reads new entries from several streams at once, in order per stream.

    It reads on a connection of its own, made with the client's settings (AUTH, database, TLS,
    RESP version), so a blocking XREAD never holds one of the client's; replies are taken as
    Redis sends them (bytes, flat field lists: cheaper than redis-py's dict per entry). Its
    ``BLOCK`` is waited for whatever the client's ``socket_timeout``.
    """

    def __init__(
        self,
        redis: Redis,
        positions: Mapping[str, str],
        *,
        block_ms: int = 5000,
        count: int = 1024,
        backoff_s: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0),
    ) -> None:
        if not positions:
            raise ValueError("nothing to read: give at least one stream")
        self._redis = redis
        self.positions = dict(positions)
        self._block_ms = block_ms
        self._count = count
        self._backoff_s = tuple(backoff_s)
        self._read_timeout = blocking_read_timeout(redis, block_ms)
        self._conn: AbstractConnection | None = None
        self._resolved = False
        self._verify: list[str] = []  # streams whose position the next read checks for trimming
        self._sent: list[tuple[str, str]] | None = None  # a read on its way, and the positions it checks

    async def batches(self) -> AsyncGenerator[list[RawEntry] | Gap, None]:
        """Yield lists of new entries (and :class:`Gap` notices) forever; retries through reconnects."""
        failures = 0
        try:
            while True:
                try:
                    if not self._resolved:
                        await self._resolve()
                    if self._sent is None:
                        await self._send_read()
                    gaps, reply = await self._receive()
                except REDIS_UNAVAILABLE as e:
                    await self._reconnect_later()
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
                        self._verify.append(stream)
                    batch += [(stream, as_text(entry_id), fields) for entry_id, fields in entries]
                    if entries:
                        self.positions[stream] = batch[-1][1]
                if not batch:
                    continue
                try:
                    await self._send_read()  # read ahead while the caller works on this batch
                except REDIS_UNAVAILABLE:
                    await self._reconnect_later()  # the next turn reads again, on a new connection
                yield batch
        finally:
            await self._disconnect()

    async def _resolve(self) -> None:
        """Turn ``$`` into concrete ids; explicit resume ids are verified by the first read."""
        latest = [s for s, p in self.positions.items() if p == LATEST]
        self.positions.update(await latest_positions(self._redis, latest))
        self._verify = [s for s, p in self.positions.items() if s not in latest and p != BEGINNING]
        self._resolved = True

    async def _send_read(self) -> None:
        """Send one ``XREAD`` from the current positions, preceded by the checks of ``_verify``
        (each stream's first entry: see :func:`gap_after`)."""
        if self._conn is None or not self._conn.is_connected:
            conn = self._redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            assert isinstance(conn, AbstractConnection)  # TCP, TLS or Unix socket
            await conn.connect()  # type: ignore[no-untyped-call]  # AUTH, SELECT, TLS, RESP3 as configured
            self._conn = conn
        checks = [(stream, self.positions[stream]) for stream in dict.fromkeys(self._verify)]
        commands: list[tuple[Any, ...]] = [("XRANGE", stream, "-", "+", "COUNT", 1) for stream, _ in checks]
        streams = [*self.positions, *self.positions.values()]
        commands.append(("XREAD", "COUNT", self._count, "BLOCK", self._block_ms, "STREAMS", *streams))
        await self._conn.send_packed_command(b"".join(map(pack, commands)), check_health=False)
        self._sent, self._verify = checks, []

    async def _receive(self) -> tuple[list[Gap], Any]:
        """The replies of the read sent last: gaps found by its checks, and the XREAD reply."""
        conn, checks, self._sent = self._conn, self._sent or [], None
        if conn is None:
            raise redis_errors.ConnectionError("the reader's connection was closed")
        gaps = []
        for stream, position in checks:
            first = await conn.read_response(disable_decoding=True)
            gap = gap_after(stream, position, as_text(first[0][0]) if first else None)
            if gap is not None:
                gaps.append(gap)
        return gaps, await conn.read_response(disable_decoding=True, timeout=self._read_timeout)

    async def _reconnect_later(self) -> None:
        """Drop the connection after a failure; the first read on the next one verifies every
        position (the streams may have been trimmed past the reader meanwhile)."""
        await self._disconnect()
        self._verify = [stream for stream, position in self.positions.items() if position != BEGINNING]

    async def _disconnect(self) -> None:
        self._sent = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.disconnect()


def blocking_read_timeout(redis: Redis, block_ms: int) -> float | None:
    """How long to wait for the reply of a command that blocks up to ``block_ms``: the client's
    ``socket_timeout``, raised above the block (redis-py would time out a wait Redis keeps)."""
    socket_timeout = redis.connection_pool.connection_kwargs.get("socket_timeout")
    return None if socket_timeout is None else max(socket_timeout, block_ms / 1000 + 10)


def gap_after(stream: str, position: str, first_id: str | None) -> Gap | None:
    """Trimming takes the oldest entries first: while the stream starts at or before ``position``
    (the entry there is held, or was deleted one by one), nothing after it was trimmed. If the
    stream now starts later, entries may have stood between the two (Redis 7.0 records no id for
    trimming, so this can be a false alarm: ``position`` may have been the last before ``first_id``)."""
    if first_id is None or parse_id(first_id) <= parse_id(position):
        return None
    return Gap(stream, position, first_id)


async def latest_positions(redis: Redis, streams: Sequence[str]) -> dict[str, str]:
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
