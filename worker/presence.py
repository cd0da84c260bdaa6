"""Which workers are live, and what they serve: each worker's record in ``<prefix>:workers``.

A worker writes its record (a JSON object: id, host, pid, queue, the graphs it serves, its job
slots and running jobs, when it started and when it was last seen) at start and with every
heartbeat, and deletes it when it stops. A record not seen for three heartbeats is a worker that
died: readers leave it out, and workers prune it. Enqueuers read the records to refuse a graph no
live worker serves; ``tokenbus jobs`` and ``status`` to name the worker holding a job (its id
begins every lease token it writes).

Light: no LangGraph; clients import the reading half.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import orjson
from redis import exceptions as redis_errors

from tokenbus.consumer.reader import as_text
from tokenbus.consumer.redis_errors import REDIS_UNAVAILABLE
from tokenbus.schemas.keys import StreamKeys
from tokenbus.worker.background import Background
from tokenbus.worker.redis_client import StreamsRedis

logger = logging.getLogger(__name__)

MISSED_HEARTBEATS = 3
"""A record not refreshed for this many of its worker's heartbeats is a worker that died."""
PRUNE_EVERY = 12
"""Heartbeats between a worker's pruning of dead workers' records."""


@dataclass(frozen=True)
class WorkerInfo:
    """One worker's record."""

    id: str
    host: str
    pid: int
    queue: str
    graphs: tuple[str, ...]
    max_jobs: int
    running: int
    started_ms: int
    seen_ms: int
    heartbeat_ms: int

    @property
    def name(self) -> str:
        return f"{self.host}:{self.pid}"

    def live(self, now_ms: float) -> bool:
        return now_ms - self.seen_ms <= MISSED_HEARTBEATS * self.heartbeat_ms

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> WorkerInfo | None:
        """The record, or None if it is not one (written by something else)."""
        try:
            values = orjson.loads(raw)
            return cls(**{**values, "graphs": tuple(values["graphs"])})
        except (orjson.JSONDecodeError, TypeError, KeyError):
            return None


async def worker_records(redis: StreamsRedis, keys: StreamKeys) -> list[WorkerInfo]:
    """Every worker record, live or not."""
    records = []
    for worker_id, raw in (await redis.hgetall(keys.workers)).items():  # type: ignore[misc]
        info = WorkerInfo.from_json(raw)
        if info is None:
            logger.warning("%s: field %s is not a worker record", keys.workers, as_text(worker_id))
            continue
        records.append(info)
    return records


async def live_workers(redis: StreamsRedis, keys: StreamKeys, *, queue: str | None = None) -> list[WorkerInfo]:
    """The workers seen in their last three heartbeats (of ``queue``, if given), by name."""
    now = time.time() * 1000
    live = [w for w in await worker_records(redis, keys) if w.live(now) and (queue is None or w.queue == queue)]
    return sorted(live, key=lambda w: (w.host, w.pid))


def holder_of(lease_token: bytes | str | None) -> str | None:
    """The id of the worker holding a lease (``arq:in-progress:<job>``), from its token."""
    if not lease_token:
        return None
    holder, sep, _ = as_text(lease_token).rpartition(":")
    return holder if sep and holder != "lock" else None


class Presence(Background):
    """This worker's record, written at start and every heartbeat; deleted by :meth:`close`."""

    task_name = "tokenbus-presence"

    def __init__(
        self,
        redis: StreamsRedis,
        keys: StreamKeys,
        *,
        worker_id: str,
        queue: str,
        graphs: Sequence[str],
        max_jobs: int,
        heartbeat_s: float,
        running: Callable[[], int],
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._running = running
        self._heartbeat_s = heartbeat_s
        self._beats = 0
        now = int(time.time() * 1000)
        self.info = WorkerInfo(
            id=worker_id, host=socket.gethostname(), pid=os.getpid(), queue=queue, graphs=tuple(graphs),
            max_jobs=max_jobs, running=0, started_ms=now, seen_ms=now, heartbeat_ms=int(heartbeat_s * 1000),
        )  # fmt: skip

    async def _loop(self) -> None:
        """Beat every heartbeat (the first beat is the starter's, awaited)."""
        while True:
            await asyncio.sleep(self._heartbeat_s)
            try:
                await self.beat()
            except redis_errors.NoPermissionError as e:
                self.refused(e)
                return
            except REDIS_UNAVAILABLE as e:
                logger.warning("writing this worker's record to %s failed (%s); retrying", self._keys.workers, e)
            except Exception:
                logger.exception("writing this worker's record to %s failed; retrying", self._keys.workers)

    async def beat(self) -> None:
        """Write the record (and, every ``PRUNE_EVERY`` beats, delete dead workers' records)."""
        now = int(time.time() * 1000)
        self.info = WorkerInfo(**{**asdict(self.info), "running": self._running(), "seen_ms": now})
        await self._redis.hset(self._keys.workers, self.info.id, self.info.to_json().decode())  # type: ignore[misc]
        if self._beats % PRUNE_EVERY == 0:
            dead = [w.id for w in await worker_records(self._redis, self._keys) if not w.live(now)]
            if dead:
                await self._redis.hdel(self._keys.workers, *dead)  # type: ignore[misc]
        self._beats += 1

    def refused(self, error: Exception) -> None:
        """Redis refuses this worker's record (its user was made before the record existed): the
        worker runs jobs all the same, unlisted."""
        logger.warning(
            "cannot write this worker's record to %s (%s): enqueuers cannot check the graphs it serves; "
            "give its Redis user the worker role's rules again (tokenbus acl worker)",
            self._keys.workers, error,
        )  # fmt: skip

    async def close(self) -> None:
        await super().close()
        try:
            await self._redis.hdel(self._keys.workers, self.info.id)  # type: ignore[misc]
        except (*REDIS_UNAVAILABLE, redis_errors.ResponseError) as e:  # the record ages out by itself
            logger.warning("deleting this worker's record from %s failed (%s)", self._keys.workers, e)
