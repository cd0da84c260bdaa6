"""The low-level tail loop: XREAD BLOCK over a set of streams, resuming from the last id seen.

Positions are always concrete ids: ``$`` ("from now") is resolved to each stream's last id
before the first read, so no entry added between two reads is skipped, and a reconnect resumes
exactly where reading stopped. A resume id older than what a stream still holds (trimmed by
``MAXLEN``) is reported as a :class:`Gap`, never skipped silently: checked before the first read,
after a reconnect, and whenever a read returns a full batch (the reader lags, maybe past the cap).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.client import NEVER_DECODE

logger = logging.getLogger(__name__)

LATEST = "$"
BEGINNING = "0-0"
_RETRYABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)


@dataclass(frozen=True, slots=True)
class Gap:
    """Entries between ``after`` and ``first_available`` were (or may have been) trimmed unread."""

    stream: str
    after: str
    first_available: str | None
    type: Literal["gap"] = "gap"

    def __str__(self) -> str:
        oldest = self.first_available
        return f"gap in {self.stream}: entries after {self.after} were trimmed (oldest left: {oldest})"


RawEntry = tuple[str, str, list[bytes]]
"""``(stream, id, fields)``, the fields as Redis sends them: ``[name, value, name, value...]``"""


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class StreamReader:
    """Reads new entries from several streams at once, in order per stream."""

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
        # XREAD replies as Redis sends them (bytes, flat field lists): redis-py's reply callback
        # (a dict per entry) costs more than decoding the entry (BENCHMARKS.md, consumer)
        self._raw = Redis(connection_pool=redis.connection_pool)
        self._raw.set_response_callback("XREAD", _as_is)
        self.positions = dict(positions)
        self._block_ms = block_ms
        self._count = count
        self._backoff_s = tuple(backoff_s)
        self._resolved = False

    async def _resolve(self) -> list[Gap]:
        """Turn ``$`` into concrete ids and check explicit resume ids for trimmed history."""
        latest = [s for s, p in self.positions.items() if p == LATEST]
        self.positions.update(await latest_positions(self._redis, latest))
        gaps = [await self.check_gap(stream) for stream in self.positions if stream not in latest]
        self._resolved = True
        return [g for g in gaps if g is not None]

    async def check_gap(self, stream: str) -> Gap | None:
        """A :class:`Gap` if entries after our position may have been trimmed unread.

        Redis 7.0 records ``max-deleted-entry-id`` only for XDEL, not for MAXLEN trimming, so a
        position whose own entry is gone while the stream now starts later also counts: entries
        may have stood between the two.
        """
        position = self.positions[stream]
        if position == BEGINNING:
            return None
        try:
            info = await self._redis.xinfo_stream(stream)
        except redis_errors.ResponseError:
            return None  # no such stream (yet)
        first = info.get("first-entry")
        first_id = _decode(first[0]) if first else None
        deleted = info.get("max-deleted-entry-id")
        if deleted is not None and parse_id(_decode(deleted)) > parse_id(position):
            return Gap(stream, position, first_id)
        if first_id is None or parse_id(first_id) <= parse_id(position):
            return None
        if await self._redis.xrange(stream, position, position):
            return None  # our last entry is still there: nothing after it was trimmed
        return Gap(stream, position, first_id)

    async def batches(self) -> AsyncIterator[list[RawEntry] | Gap]:
        """Yield lists of new entries (and :class:`Gap` notices) forever; retries through reconnects."""
        failures = 0
        reconnected = False
        while True:
            try:
                if not self._resolved:
                    for gap in await self._resolve():
                        yield gap
                reply = await self._raw.execute_command(
                    "XREAD", "COUNT", self._count, "BLOCK", self._block_ms, "STREAMS",
                    *self.positions, *self.positions.values(), **{NEVER_DECODE: True},
                )  # type: ignore[no-untyped-call]  # fmt: skip
            except _RETRYABLE as e:
                delay = self._backoff_s[min(failures, len(self._backoff_s) - 1)]
                failures += 1
                logger.warning("reading %s failed (%s); resuming in %.1fs", ", ".join(self.positions), e, delay)
                await asyncio.sleep(delay)
                reconnected = True
                continue
            failures = 0
            if reconnected:  # back after an outage: was history trimmed past us meanwhile?
                reconnected = False
                for stream in self.positions:
                    trimmed = await self._safe_check_gap(stream)
                    if trimmed is not None:
                        yield trimmed
            if not reply:
                continue
            batch: list[RawEntry] = []
            for stream_name, entries in _items(reply):
                stream = stream_name.decode()
                if len(entries) >= self._count:  # a full reply: this reader lags, and may lag past the cap
                    lagging = await self._safe_check_gap(stream)
                    if lagging is not None:
                        yield lagging
                batch += [(stream, entry_id.decode(), fields) for entry_id, fields in entries]
                if entries:
                    self.positions[stream] = batch[-1][1]
            yield batch

    async def _safe_check_gap(self, stream: str) -> Gap | None:
        try:
            return await self.check_gap(stream)
        except _RETRYABLE:
            return None


async def latest_positions(redis: Redis, streams: Sequence[str]) -> dict[str, str]:
    """The id of each stream's newest entry (``0-0`` for an empty or missing stream): a concrete
    "from now on" position to resume from, unlike ``$``."""
    if not streams:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xrevrange(stream, count=1)
        results = await pipe.execute()
    return {s: _decode(r[0][0]) if r else BEGINNING for s, r in zip(streams, results, strict=True)}


def _as_is(response: Any, **kwargs: Any) -> Any:
    return response


def _items(reply: Any) -> Iterable[tuple[bytes, list[tuple[bytes, list[bytes]]]]]:
    """``(stream, entries)`` pairs of an XREAD reply: a map in RESP3, a list of pairs in RESP2."""
    return reply.items() if isinstance(reply, dict) else reply


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
