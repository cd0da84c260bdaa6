"""The producer's API: enqueue graph jobs for tokenbus workers (and abort them)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import abort_jobs_ss
from arq.utils import timestamp_ms
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from tokenbus.consumer.jobs import job_result
from tokenbus.schemas.entries import EntryType
from tokenbus.schemas.job import ALL_MODES, JOB_FUNCTION, JobRequest, StreamMode
from tokenbus.schemas.keys import DEFAULT_PREFIX, StreamKeys, wake_channel
from tokenbus.worker.redis_client import redis_url
from tokenbus.worker.serializer import job_deserializer, job_serializer
from tokenbus.worker.settings import Settings

logger = logging.getLogger(__name__)


class TokenbusClient:
    """Enqueues ``run_graph`` jobs. Uses the arq pool it is given, or opens (and closes) its own."""

    def __init__(
        self, pool: ArqRedis, *, queue_name: str, prefix: str = DEFAULT_PREFIX, owns_pool: bool = False
    ) -> None:
        self._pool = pool
        self._queue_name = queue_name
        self._prefix = prefix
        self._owns_pool = owns_pool

    @classmethod
    async def connect(cls, settings: Settings) -> TokenbusClient:
        pool = await create_pool(
            RedisSettings.from_dsn(redis_url(settings)),
            job_serializer=job_serializer,
            job_deserializer=job_deserializer,
            default_queue_name=settings.queue_name,
        )
        return cls(pool, queue_name=settings.queue_name, prefix=settings.prefix, owns_pool=True)

    @classmethod
    def sharing(cls, redis: Redis, settings: Settings) -> TokenbusClient:
        """A client on the connection pool of ``redis`` (which its creator closes); it connects
        when first used, so a service can start while Redis is down."""
        pool = ArqRedis(
            redis.connection_pool,
            job_serializer=job_serializer,
            job_deserializer=job_deserializer,
            default_queue_name=settings.queue_name,
        )
        return cls(pool, queue_name=settings.queue_name, prefix=settings.prefix)

    async def close(self) -> None:
        if self._owns_pool:
            await self._pool.aclose()

    async def __aenter__(self) -> TokenbusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def enqueue(
        self,
        graph: str,
        input: Mapping[str, Any] | str | None = None,
        *,
        modes: Iterable[StreamMode] = ALL_MODES,
        tags: Iterable[str] | None = None,
        job_id: str | None = None,
        timeout_s: float | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> str:
        """Validate and enqueue a job; return its id.

        With ``job_id``, enqueueing is idempotent: while that job is queued or running, or its
        stream is kept (``TOKENBUS_JOB_TTL`` after it ended), enqueueing it again does nothing and
        returns the same id. (A worker never runs a job whose stream holds a final entry either,
        whoever enqueued it.)
        Raises :class:`tokenbus.schemas.errors.InvalidJobRequest` for a request the worker would reject.
        """
        request = JobRequest.parse(
            {
                "graph": graph,
                "input": {} if input is None else input,
                "modes": tuple(modes),
                "tags": None if tags is None else tuple(tags),
                "job_id": job_id,
                "timeout_s": timeout_s,
                "config": {} if config is None else config,
            }
        )
        return await self.enqueue_request(request)

    async def enqueue_request(self, request: JobRequest) -> str:
        job_id = request.job_id or uuid.uuid4().hex
        if request.job_id is not None and await self._pool.exists(StreamKeys(self._prefix).job(job_id)):
            return job_id  # it ran, or runs: its stream is its idempotency record (TOKENBUS_JOB_TTL)
        job = await self._pool.enqueue_job(JOB_FUNCTION, request.to_arg(), _job_id=job_id, _queue_name=self._queue_name)
        if job is not None:  # None: the job was already queued (an idempotent enqueue)
            try:
                await self._pool.publish(wake_channel(self._queue_name), b"")
            except redis_errors.ResponseError as e:  # no PUBLISH right, say: the job is queued all the same
                logger.warning(
                    "job %s is queued, but announcing it on %s failed (%s): workers start it at their next poll",
                    job_id, wake_channel(self._queue_name), e,
                )  # fmt: skip
        return job_id

    async def abort(self, job_id: str, *, timeout_s: float | None = None) -> bool:
        """Ask the worker running (or about to run) ``job_id`` to cancel it.

        With ``timeout_s``, wait that long for the job's final entry and return whether it was
        ``cancelled``; without, return True once the request is recorded. The job's model calls are
        cancelled and their HTTP streams closed.
        """
        await self._pool.zadd(abort_jobs_ss, {job_id: timestamp_ms()})
        if timeout_s is None:
            return True
        async with asyncio.timeout(timeout_s):
            view = await job_result(self._pool, job_id, prefix=self._prefix, wait=True)
        return view.status is EntryType.CANCELLED
