"""Attempts that lost their worker: every attempt still gets its terminal entry.

A job writes its own terminal entry in ``finally``; only a worker killed outright (SIGKILL, OOM,
power) skips it. Two things close such an attempt, so no reader waits forever:

- the job's **next attempt**, before it starts, closes the previous one with an ``error`` entry
  marked ``retry`` (another attempt follows);
- the **sweeper**, for a job arq will not run again (max tries reached, or expired): every worker
  keeps the jobs it runs in ``<prefix>:running`` with a heartbeat, and any worker that finds a
  stale one that arq no longer holds (no in-progress key, no job key) closes it for good.
"""

from __future__ import annotations

import asyncio
import logging
import time

from arq.constants import in_progress_key_prefix, job_key_prefix
from redis.asyncio import Redis

from schemas.entries import ENTRY_CLASSES, Entry, EntryType
from schemas.keys import StreamKeys
from worker.emitter import StreamLimits

logger = logging.getLogger(__name__)

SCAN_PAGE = 500
WORKER_LOST = "the worker running attempt {attempt} stopped without ending it, and the job will not run again ({why})"


def running_key(keys: StreamKeys) -> str:
    return f"{keys.prefix}:running"


async def last_attempt(redis: Redis, keys: StreamKeys, job_id: str) -> tuple[Entry | None, set[str]]:
    """The newest entry of the job stream, and the tags its attempt wrote to (if it did not end)."""
    key = keys.job(job_id)
    newest = await redis.xrevrange(key, count=1)
    if not newest:
        return None, set()
    last = Entry.decode(newest[0][1], id=newest[0][0].decode(), stream=key)
    tags: set[str] = set()
    if last.is_terminal:
        return last, tags
    end = "+"
    while True:  # walk back through this attempt's entries for the tags it fanned out to
        page = await redis.xrevrange(key, max=end, count=SCAN_PAGE)
        for entry_id, fields in page:
            entry = Entry.decode(fields, id=entry_id.decode(), stream=key)
            if entry.attempt != last.attempt:
                return last, tags
            tags.update(entry.tags)
        if len(page) < SCAN_PAGE:
            return last, tags
        end = "(" + page[-1][0].decode()


async def close_attempt(
    redis: Redis, keys: StreamKeys, limits: StreamLimits, job_id: str, *, retry: bool, reason: str,
    kind: EntryType = EntryType.ERROR, error_type: str = "WorkerLost", unstarted_attempt: int | None = None,
) -> Entry | None:  # fmt: skip
    """Write the terminal entry of the job's newest attempt if it has none.

    ``unstarted_attempt``: the job never started (arq failed it before tokenbus code ran); write
    that attempt's terminal entry even though the job stream is empty.
    """
    last, tags = await last_attempt(redis, keys, job_id)
    if unstarted_attempt is not None and (last is None or last.attempt < unstarted_attempt):
        attempt, seq, tags = unstarted_attempt, 0, set()
    elif last is None or last.is_terminal:
        return None
    else:
        attempt, seq = last.attempt, last.seq + 1
    entry = ENTRY_CLASSES[kind](
        type=kind, job=job_id, attempt=attempt, seq=seq, ts=time.time_ns() // 1_000_000,
        data={"chunks": None}, error=reason.format(attempt=attempt), error_type=error_type, retry=retry,
    )  # fmt: skip
    fields = entry.encode()
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.job(job_id), fields, maxlen=limits.job_maxlen, approximate=True)  # type: ignore[arg-type]
        for tag in sorted(tags):
            pipe.xadd(keys.tag(tag), fields, maxlen=limits.tag_maxlen, approximate=True)  # type: ignore[arg-type]
        if not retry:
            pipe.expire(keys.job(job_id), limits.job_ttl_s)
        await pipe.execute()
    logger.warning("job %s: closed attempt %d (%s)", job_id, attempt, entry.error)
    return entry


class Sweeper:
    """Heartbeats for this worker's running jobs, and terminal entries for jobs nobody will finish."""

    def __init__(self, redis: Redis, keys: StreamKeys, limits: StreamLimits, *, heartbeat_s: float = 5.0) -> None:
        self._redis = redis
        self._keys = keys
        self._limits = limits
        self._heartbeat_s = heartbeat_s
        self.running: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Sweeper:
        self._task = asyncio.create_task(self._loop(), name="tokenbus-sweeper")
        return self

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.beat()
                await self.sweep()
            except Exception:  # Redis away, say: try again at the next beat
                logger.warning("sweeper pass failed", exc_info=True)
            await asyncio.sleep(self._heartbeat_s)

    async def beat(self) -> None:
        if self.running:
            now = time.time() * 1000
            await self._redis.zadd(running_key(self._keys), dict.fromkeys(self.running, now))

    async def sweep(self) -> list[str]:
        """Close the jobs whose heartbeat stopped and that arq will not run again; return their ids."""
        stale_before = time.time() * 1000 - 3 * self._heartbeat_s * 1000
        stale = await self._redis.zrangebyscore(running_key(self._keys), "-inf", stale_before, start=0, num=100)
        closed = []
        for raw in stale:
            job_id = raw.decode()
            if job_id in self.running:
                continue
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.exists(in_progress_key_prefix + job_id)
                pipe.exists(job_key_prefix + job_id)
                in_progress, queued = await pipe.execute()
            if in_progress or queued:
                continue  # still running elsewhere, or arq will run it again (that attempt closes this one)
            lock = f"{self._keys.prefix}:sweeping:{{{job_id}}}"
            if not await self._redis.set(lock, b"1", nx=True, ex=60):
                continue
            entry = await close_attempt(
                self._redis, self._keys, self._limits, job_id, retry=False,
                reason=WORKER_LOST.format(attempt="{attempt}", why="max tries reached or expired"),
            )  # fmt: skip
            await self._redis.zrem(running_key(self._keys), job_id)
            if entry is not None:
                closed.append(job_id)
        return closed
