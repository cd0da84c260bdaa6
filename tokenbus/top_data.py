"""What ``tokenbus top`` shows, gathered from Redis: no terminal here (:mod:`tokenbus.top` draws it).

Every refresh reads what is cheap to read, never a whole stream:

- running jobs, the queue's size and the live workers through :func:`list_jobs` (what ``tokenbus
  jobs`` shows): per running job its arq envelope, lease and the newest entry of its stream;
- tag streams with ``XINFO STREAM`` each (length, ``entries-added``, the newest id, how many
  consumer groups), and the groups of the streams that have some with ``XINFO GROUPS``;
- recent errors from ``<prefix>:finished`` (the newest finished jobs): the status of a job new to
  that set is read once (a finished job's status does not change) and kept while it is there.

Rates are differences between two samples divided by the time between them: a job's tokens from
its newest entry's ``seq`` (per attempt), a tag stream's from ``entries-added``, which counts
every entry ever added, so trimming (``MAXLEN ~``) does not hide what was written. The first
sample of anything has no rate yet.

Tag streams are found with ``SCAN MATCH <prefix>:tag:{*} TYPE stream`` every ``rescan_s``
seconds, examining at most ``scan_budget`` keys; of those found, the ``max_tags`` written to
most recently are sampled (the others may be idle for days). Tags named by the caller are
sampled instead, with no ``SCAN``. The tags of running jobs would not do: a job's chunks carry
whatever tags its graph's models were given, which nothing records before they are written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import Redis, RedisCluster

from tokenbus.consumer.groups import GroupStats, group_stats
from tokenbus.consumer.reader import as_text, parse_id
from tokenbus.schemas.errors import InvalidTag
from tokenbus.schemas.keys import StreamKeys, validate_tag
from tokenbus.worker.presence import WorkerInfo
from tokenbus.worker.redis_client import StreamsRedis
from tokenbus.worker.status import JobState, JobStatus, job_statuses, list_jobs

K = TypeVar("K", bound=Hashable)

RESCAN_S = 10.0
"""Seconds between two searches for tag streams."""
SCAN_BUDGET = 20_000
"""Keys one search for tag streams examines at most (``SCAN COUNT 1000`` calls, twenty of them)."""
SCAN_COUNT = 1000
MAX_TAGS = 30
"""Tag streams sampled at most: those written to most recently."""
MAX_CANDIDATES = 1000
"""Tag streams found by a search whose newest entry is looked at to choose the ``MAX_TAGS``."""
ERROR_LOOKBACK = 200
"""The newest finished jobs looked through for errors."""
ERRORS_SHOWN = 10


class Rates(Generic[K]):
    """Per-second rates of counters sampled now and then: each key's increase since its previous
    sample, over the time between them. None for a key new to this sample, or whose count went
    down (a stream made anew, a counter reset): the sample is the base of the next rate."""

    def __init__(self) -> None:
        self._last: dict[K, tuple[int, float]] = {}

    def update(self, counts: Mapping[K, int], now: float) -> dict[K, float | None]:
        rates: dict[K, float | None] = {}
        for key, count in counts.items():
            previous = self._last.get(key)
            if previous is None or count < previous[0] or now <= previous[1]:
                rates[key] = None
            else:
                rates[key] = (count - previous[0]) / (now - previous[1])
        self._last = {key: (count, now) for key, count in counts.items()}  # keys gone are forgotten
        return rates


@dataclass(frozen=True)
class JobSample:
    """A running job, and how fast it writes."""

    status: JobStatus
    rate: float | None
    """Entries of its attempt per second since the previous sample."""


@dataclass(frozen=True)
class StreamInfo:
    """What ``XINFO STREAM`` tells of a stream."""

    length: int
    added: int
    """Entries ever added (Redis 7.0's ``entries-added``; the length on older servers)."""
    last_id: str
    groups: int

    @property
    def last_ms(self) -> int | None:
        """When the newest entry was added (its id's time); None for a stream never written."""
        ms = parse_id(self.last_id)[0]
        return ms or None


@dataclass(frozen=True)
class TagSample:
    tag: str
    stream: str
    info: StreamInfo
    rate: float | None
    """Entries (chunks, and each attempt's terminal entry) per second since the previous sample."""


@dataclass(frozen=True)
class Snapshot:
    """One refresh's worth of what top shows."""

    taken_ms: float
    running: list[JobSample]
    """The running jobs (the limit's oldest)."""
    more_running: bool
    """Whether more jobs run than ``running`` shows."""
    queued: int
    workers: list[WorkerInfo]
    tags: list[TagSample]
    tags_found: int
    """Tag streams the last search found (or the number named)."""
    tags_complete: bool
    """False if the last search stopped at its budget before seeing every key."""
    groups: list[GroupStats]
    errors: list[JobStatus]
    """Jobs among the newest finished that ended ``error``, newest first."""

    @property
    def jobs_rate(self) -> float:
        return sum(j.rate or 0.0 for j in self.running)


class TopSampler:
    """Samples one queue and prefix; keeps what rates and the error list need between samples."""

    def __init__(
        self,
        redis: Redis,
        *,
        keys: StreamKeys,
        queue_name: str,
        streams: StreamsRedis | None = None,
        tags: Sequence[str] = (),
        limit: int = 20,
        rescan_s: float = RESCAN_S,
        scan_budget: int = SCAN_BUDGET,
        max_tags: int = MAX_TAGS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._streams: StreamsRedis = redis if streams is None else streams
        self._keys = keys
        self._queue = queue_name
        self._named = [validate_tag(t) for t in dict.fromkeys(tags)]
        self._limit = limit
        self._rescan_s = rescan_s
        self._scan_budget = scan_budget
        self._max_tags = max_tags
        self._clock = clock
        self._job_rates: Rates[tuple[str, int]] = Rates()
        self._tag_rates: Rates[str] = Rates()
        self._tags: list[str] = list(self._named)
        self._tags_found = len(self._named)
        self._tags_complete = True
        self._scanned_at: float | None = None
        self._finished: dict[str, JobStatus | None] = {}

    async def sample(self) -> Snapshot:
        # one more than shown, to tell whether there are more
        listing = await list_jobs(
            self._redis, keys=self._keys, queue_name=self._queue, limit=self._limit + 1, streams=self._streams
        )
        now = self._clock()
        job_rates = self._job_rates.update({(s.job, s.attempt): s.entries for s in listing.running}, now)
        running = [JobSample(s, job_rates[(s.job, s.attempt)]) for s in listing.running[: self._limit]]
        tags = await self._sample_tags()
        with_groups = [t.stream for t in tags if t.info.groups]
        groups = await group_stats(self._streams, with_groups) if with_groups else []
        return Snapshot(
            taken_ms=time.time() * 1000, running=running, more_running=len(listing.running) > self._limit,
            queued=listing.queued_total, workers=listing.workers,
            tags=tags, tags_found=self._tags_found, tags_complete=self._tags_complete, groups=groups,
            errors=await self._errors(listing.finished),
        )  # fmt: skip

    # -- tag streams -------------------------------------------------------------------------------
    async def _sample_tags(self) -> list[TagSample]:
        if not self._named and (self._scanned_at is None or self._clock() - self._scanned_at >= self._rescan_s):
            await self._discover()
        infos = await stream_infos(self._streams, [self._keys.tag(t) for t in self._tags])
        rates = self._tag_rates.update({s: i.added for s, i in infos.items()}, self._clock())
        return [
            TagSample(tag, stream, infos[stream], rates[stream])
            for tag, stream in ((t, self._keys.tag(t)) for t in self._tags)
            if stream in infos
        ]

    async def _discover(self) -> None:
        streams, self._tags_complete = await find_tag_streams(self._streams, self._keys, budget=self._scan_budget)
        self._scanned_at = self._clock()
        self._tags_found = len(streams)
        if len(streams) > self._max_tags:  # the ones written to last
            infos = await stream_infos(self._streams, sorted(streams)[:MAX_CANDIDATES])
            newest = sorted(infos, key=lambda s: parse_id(infos[s].last_id), reverse=True)
            streams = {s: streams[s] for s in newest[: self._max_tags]}
        self._tags = sorted(streams.values())

    # -- errors ------------------------------------------------------------------------------------
    async def _errors(self, finished: Sequence[JobStatus]) -> list[JobStatus]:
        ids = [as_text(i) for i in await self._streams.zrevrange(self._keys.finished, 0, ERROR_LOOKBACK - 1)]
        fresh = {s.job: s for s in finished}  # read just now by list_jobs
        known: dict[str, JobStatus | None] = {}
        unread = []
        for job_id in ids:
            if job_id in self._finished or job_id in fresh:
                known[job_id] = self._finished[job_id] if job_id in self._finished else fresh[job_id]
            else:
                unread.append(job_id)
        if unread:
            statuses = await job_statuses(
                self._redis, unread, keys=self._keys, queue_name=self._queue, streams=self._streams
            )
            known.update(zip(unread, statuses, strict=True))
        self._finished = {job_id: known[job_id] for job_id in ids}  # newest first; None: its stream expired
        errors = [s for s in self._finished.values() if s is not None and s.state is JobState.ERROR]
        return errors[:ERRORS_SHOWN]


async def find_tag_streams(
    redis: StreamsRedis, keys: StreamKeys, *, budget: int = SCAN_BUDGET
) -> tuple[dict[str, str], bool]:
    """The tag streams of ``keys``'s prefix (stream key → tag) that ``SCAN`` finds examining at most
    ``budget`` keys, and whether it saw them all. Keys whose tag is not a valid one are left out.
    On a Redis Cluster every primary is scanned in turn (redis-py's ``scan_iter``)."""
    head = f"{keys.prefix}:tag:{{"  # the prefix's alphabet has no glob characters
    found: dict[str, str] = {}
    if isinstance(redis, RedisCluster):
        examined = 0
        async for key in redis.scan_iter(match=head + "*}", count=SCAN_COUNT, _type="stream"):
            stream = as_text(key)
            if is_valid_tag(tag := stream[len(head) : -1]):
                found[stream] = tag
            examined += 1
            if examined >= budget:
                return found, False
        return found, True
    cursor, examined = 0, 0
    while True:
        cursor, batch = await redis.scan(cursor, match=head + "*}", count=SCAN_COUNT, _type="stream")
        examined += SCAN_COUNT
        for key in batch:
            stream = as_text(key)
            tag = stream[len(head) : -1]
            if is_valid_tag(tag):
                found[stream] = tag
        if cursor == 0:
            return found, True
        if examined >= budget:
            return found, False


def is_valid_tag(tag: str) -> bool:
    try:
        validate_tag(tag)
    except InvalidTag:
        return False
    return True


async def stream_infos(redis: StreamsRedis, streams: Sequence[str]) -> dict[str, StreamInfo]:
    """``XINFO STREAM`` of each stream, in one round trip; streams that are gone are left out."""
    if not streams:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_stream(stream)
        replies = await pipe.execute(raise_on_error=False)
    infos = {}
    for stream, reply in zip(streams, replies, strict=True):
        if isinstance(reply, redis_errors.NoPermissionError):
            raise reply
        if isinstance(reply, redis_errors.ResponseError):  # deleted since it was found, or not a stream
            continue
        infos[stream] = _stream_info(reply)
    return infos


def _stream_info(reply: dict[str, Any]) -> StreamInfo:
    length = int(reply["length"])
    added = reply.get("entries-added")
    return StreamInfo(
        length=length, added=length if added is None else int(added),
        last_id=as_text(reply["last-generated-id"]), groups=int(reply["groups"]),
    )  # fmt: skip
