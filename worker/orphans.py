"""Attempts that lost their worker: every attempt still gets its terminal entry.

A job writes its own terminal entry in ``finally``; only a worker killed outright (SIGKILL, OOM,
power) skips it. Two things close such an attempt, so no reader waits forever:

- the job's **next attempt**, before it starts, closes the previous one with an ``error`` entry
  marked ``retry`` (another attempt follows);
- the **sweeper**: every worker keeps the jobs it runs in ``<prefix>:running`` with a heartbeat,
  and any worker that finds a stale one whose lease lapsed (no in-progress key) closes it: with
  ``retry`` when arq will run the job again (its job key is there), so followers hear of it as
  soon as the lease lapses rather than when the next attempt starts; for good when arq will not
  (max tries reached, or expired).
"""

from __future__ import annotations

import asyncio
import logging
import time

from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from tokenbus.schemas.entries import ENTRY_CLASSES, Entry, EntryType, ErrorType
from tokenbus.schemas.errors import MalformedEntry
from tokenbus.schemas.keys import StreamKeys
from tokenbus.worker.background import Background
from tokenbus.worker.emitter import StreamLimits, finished_commands
from tokenbus.worker.lease import claimed
from tokenbus.worker.redis_client import StreamsRedis

logger = logging.getLogger(__name__)

SCAN_PAGE = 500
LEASE_LAPSED = "attempt {attempt} was interrupted (its worker stopped renewing its lease); the job will run again"
WORKER_LOST = "the worker running attempt {attempt} stopped without ending it, and the job will not run again ({why})"


async def newest_entry(redis: StreamsRedis, keys: StreamKeys, job_id: str) -> Entry | None:
    """The last entry of the job's stream (None if there is none, or it is not a tokenbus entry)."""
    key = keys.job(job_id)
    newest = await redis.xrevrange(key, count=1)
    if not newest:
        return None
    try:
        return Entry.decode(newest[0][1], id=newest[0][0].decode(), stream=key)
    except MalformedEntry:
        logger.warning("job %s: the last entry of %s is not a tokenbus entry", job_id, key)
        return None


async def last_attempt(redis: StreamsRedis, keys: StreamKeys, job_id: str) -> tuple[Entry | None, set[str]]:
    """The newest entry of the job stream, and the tags its attempt wrote to (if it did not end)."""
    key = keys.job(job_id)
    last = await newest_entry(redis, keys, job_id)
    tags: set[str] = set()
    if last is None or last.is_terminal:
        return last, tags
    end = "+"
    while True:  # walk back through this attempt's entries for the tags it fanned out to
        page = await redis.xrevrange(key, max=end, count=SCAN_PAGE)
        for entry_id, fields in page:
            try:
                entry = Entry.decode(fields, id=entry_id.decode(), stream=key)
            except MalformedEntry:
                continue
            if entry.attempt != last.attempt:
                return last, tags
            tags.update(entry.tags)
        if len(page) < SCAN_PAGE:
            return last, tags
        end = "(" + page[-1][0].decode()


# KEYS the job stream; ARGV maxlen, seconds to expire in (0: none), the entry's fields. One key: atomic
# on a Redis Cluster too.
_CLOSE_JOB_STREAM = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
if ARGV[2] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


async def close_attempt(
    redis: StreamsRedis, keys: StreamKeys, limits: StreamLimits, job_id: str, *, retry: bool, reason: str,
    kind: EntryType = EntryType.ERROR, error_type: str = ErrorType.WORKER_LOST, unstarted: bool = False,
) -> Entry | None:  # fmt: skip
    """Write the terminal entry of the job's newest attempt if it has none.

    Closing for good (``retry=False``) a job whose newest attempt ended with ``retry`` writes the
    final entry of the attempt that was to follow. ``unstarted``: the job may never have started
    (arq failed it before tokenbus code ran): write attempt 1's entry if the stream is empty.
    """
    last, tags = await last_attempt(redis, keys, job_id)
    if last is None:
        if not unstarted:
            return None
        attempt, seq = 1, 0
    elif last.is_final or (last.is_terminal and retry):
        return None
    elif last.is_terminal:  # the attempt after a retry never ran
        attempt, seq = last.attempt + 1, 0
    else:
        attempt, seq = last.attempt, last.next_seq
    entry = ENTRY_CLASSES[kind](
        type=kind, job=job_id, attempt=attempt, seq=seq, ts=time.time_ns() // 1_000_000,
        data={"chunks": None}, error=one_line(reason.format(attempt=attempt)), error_type=error_type, retry=retry,
    )  # fmt: skip
    fields = entry.encode()
    # The tag streams' copies first, then the job stream's entry (and its expiry) in one script: the
    # job stream says whether the attempt is closed (last_attempt), so a failure between the two
    # leaves it open, and whoever closes it next writes the copies again (with the same (job,
    # attempt, seq): readers drop the second). No MULTI across them: on a Redis Cluster the
    # streams may live on different nodes.
    if tags:
        async with redis.pipeline(transaction=False) as pipe:
            for tag in sorted(tags):
                pipe.xadd(keys.tag(tag), fields, maxlen=limits.tag_maxlen, approximate=True)  # type: ignore[arg-type]
            await pipe.execute()
    flat = [value for pair in fields.items() for value in pair]
    ttl = 0 if retry else limits.job_ttl_s
    args = (keys.job(job_id), limits.job_maxlen, ttl, *flat)
    await redis.eval(_CLOSE_JOB_STREAM, 1, *args)  # type: ignore[arg-type,misc]
    if not retry:  # listed among the newest finished; an index Redis refuses fails nothing
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for command in finished_commands(keys, job_id, entry.ts):
                    pipe.execute_command(*command)
                await pipe.execute()
        except redis_errors.ResponseError as e:
            logger.warning("job %s: could not list it in %s: %s", job_id, keys.finished, e)
    logger.warning("job %s: closed attempt %d (%s)", job_id, attempt, entry.error)
    return entry


def one_line(text: str, limit: int = 300) -> str:
    """An error for an entry: one line, at most ``limit`` characters (it may quote anything)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Sweeper(Background):
    """Heartbeats for this worker's running jobs, and terminal entries for jobs nobody will finish."""

    task_name = "tokenbus-sweeper"

    def __init__(
        self,
        redis: StreamsRedis,
        keys: StreamKeys,
        limits: StreamLimits,
        *,
        queue: Redis | None = None,
        heartbeat_s: float = 5.0,
        max_tries: int = 5,
    ) -> None:
        """``redis``: the streams' deployment; ``queue``: arq's Redis (default: ``redis``, one Redis)."""
        self._redis = redis
        if queue is None:
            if not isinstance(redis, Redis):
                raise TypeError("a sweeper of streams on a Redis Cluster needs the queue's Redis (queue=...)")
            queue = redis
        self._queue = queue
        self._max_tries = max_tries  # the workers' TOKENBUS_MAX_TRIES: past it arq will not run a job again
        self._keys = keys
        self._limits = limits
        self._heartbeat_s = heartbeat_s
        self.running: set[str] = set()
        # read by the metrics endpoint
        self.failures = 0
        """Passes that failed (Redis away, say)."""
        self.closed_retry = 0
        """Attempts closed whose job runs again (their worker stopped; the lease lapsed)."""
        self.closed_final = 0
        """Jobs closed for good (their worker stopped, and arq will not run them again)."""

    async def _loop(self) -> None:
        while True:
            try:
                await self.beat()
                await self.sweep()
            except Exception:  # Redis away, say: try again at the next beat
                self.failures += 1
                logger.warning("sweeper pass failed", exc_info=True)
            await asyncio.sleep(self._heartbeat_s)

    async def beat(self) -> None:
        if self.running:
            now = time.time() * 1000
            await self._redis.zadd(self._keys.running, dict.fromkeys(self.running, now))

    async def sweep(self) -> list[str]:
        """Close the attempts whose heartbeat stopped and whose lease lapsed: for good if arq will
        not run the job again, else with ``retry`` (the next attempt follows); return their ids."""
        stale_before = time.time() * 1000 - 3 * self._heartbeat_s * 1000
        stale = await self._redis.zrangebyscore(self._keys.running, "-inf", stale_before, start=0, num=100)
        closed = []
        for raw in stale:
            job_id = raw.decode()
            if job_id in self.running:
                continue
            async with self._queue.pipeline(transaction=False) as pipe:
                pipe.exists(in_progress_key_prefix + job_id)
                pipe.exists(job_key_prefix + job_id)
                pipe.get(retry_key_prefix + job_id)
                in_progress, queued, tries = await pipe.execute()
            if in_progress:
                continue  # still running elsewhere (its lease is live)
            if queued and int(tries or 0) < self._max_tries:
                # its worker stopped and the lease lapsed: arq runs it again; tell followers now
                async with claimed(self._queue, job_id, ms=60_000) as held:  # no attempt starts meanwhile
                    entry = None
                    if held:
                        entry = await close_attempt(
                            self._redis, self._keys, self._limits, job_id, retry=True, reason=LEASE_LAPSED
                        )
            else:
                lock = self._keys.sweeping(job_id)
                if not await self._redis.set(lock, b"1", nx=True, ex=60):
                    continue
                why = f"max {self._max_tries} tries reached, or expired"
                # unstarted: listed as running, it started, but its stream may hold nothing (every
                # write of it refused, its worker gave up): its readers still need an end
                entry = await close_attempt(
                    self._redis, self._keys, self._limits, job_id, retry=False,
                    reason=WORKER_LOST.format(attempt="{attempt}", why=why), unstarted=True,
                )  # fmt: skip
            await self._redis.zrem(self._keys.running, job_id)
            if entry is not None:
                closed.append(job_id)
                if entry.retry:
                    self.closed_retry += 1
                else:
                    self.closed_final += 1
        return closed
