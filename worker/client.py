"""The producer's and operator's API: enqueue graph jobs for tokenbus workers, see where they
are, read their results, cancel them, and look after the dead letters of consumer groups."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, cast

from arq.connections import ArqRedis, create_pool
from arq.constants import abort_jobs_ss, expires_extra_ms
from arq.utils import timestamp_ms
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from tokenbus.consumer.dead import DeadLetter, dead_letter, dead_letters, redrive
from tokenbus.consumer.jobs import JobView, job_result
from tokenbus.schemas.entries import EntryType
from tokenbus.schemas.errors import UnknownGraph, UnknownJob
from tokenbus.schemas.job import ALL_MODES, JOB_FUNCTION, JobRequest, StreamMode
from tokenbus.schemas.keys import DEFAULT_PREFIX, StreamKeys, wake_channel
from tokenbus.worker.presence import WorkerInfo, live_workers
from tokenbus.worker.redis_client import StreamsRedis, arq_sentinel_pool, arq_settings, streams_from_settings
from tokenbus.worker.serializer import job_deserializer, job_serializer
from tokenbus.worker.settings import Settings
from tokenbus.worker.status import JobList, JobStatus, job_status, list_jobs

logger = logging.getLogger(__name__)

SERVED_CACHE_S = 5.0
"""How long a graph a live worker served is taken as served without asking again."""


class TokenbusClient:
    """Enqueues ``run_graph`` jobs. Uses the arq pool it is given, or opens (and closes) its own;
    reads and writes the keys under the prefix on ``streams`` (default: the pool's Redis), which
    may be a deployment of their own (``TOKENBUS_STREAMS_URL``), a Redis Cluster possibly."""

    def __init__(
        self,
        pool: ArqRedis,
        *,
        queue_name: str,
        prefix: str = DEFAULT_PREFIX,
        owns_pool: bool = False,
        streams: StreamsRedis | None = None,
        owns_streams: bool = False,
    ) -> None:
        self._pool = pool
        self._streams: StreamsRedis = pool if streams is None else streams
        self._owns_streams = owns_streams and streams is not None
        self._queue_name = queue_name
        self._prefix = prefix
        self._owns_pool = owns_pool
        self._keys = StreamKeys(prefix)
        self._served: tuple[float, frozenset[str]] = (0.0, frozenset())

    @classmethod
    async def connect(cls, settings: Settings) -> TokenbusClient:
        if settings.sentinels is None:
            pool = await create_pool(
                arq_settings(settings),
                job_serializer=job_serializer,
                job_deserializer=job_deserializer,
                default_queue_name=settings.queue_name,
            )
        else:  # it connects when first used
            pool = arq_sentinel_pool(
                settings,
                job_serializer=job_serializer,
                job_deserializer=job_deserializer,
                default_queue_name=settings.queue_name,
                expires_extra_ms=expires_extra_ms,
            )
        streams = streams_from_settings(settings) if settings.streams_apart else None
        return cls(
            pool, queue_name=settings.queue_name, prefix=settings.prefix, owns_pool=True,
            streams=streams, owns_streams=True,
        )  # fmt: skip

    @classmethod
    def sharing(cls, redis: Redis, settings: Settings, *, streams: StreamsRedis | None = None) -> TokenbusClient:
        """A client on the connection pool of ``redis`` (the queue's) and on ``streams`` (default:
        ``redis``), which their creator closes; it connects when first used, so a service can
        start while Redis is down."""
        pool = ArqRedis(
            redis.connection_pool,
            job_serializer=job_serializer,
            job_deserializer=job_deserializer,
            default_queue_name=settings.queue_name,
        )
        return cls(pool, queue_name=settings.queue_name, prefix=settings.prefix, streams=streams)

    async def close(self) -> None:
        if self._owns_streams:
            await self._streams.aclose()
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
        check_graph: bool = True,
    ) -> str:
        """Validate and enqueue a job; return its id.

        With ``job_id``, enqueueing is idempotent: while that job is queued or running, or its
        stream is kept (``TOKENBUS_JOB_TTL`` after it ended), enqueueing it again does nothing and
        returns the same id. (A worker never runs a job whose stream holds a final entry either,
        whoever enqueued it.)
        Raises :class:`tokenbus.schemas.errors.InvalidJobRequest` for a request the worker would
        reject, and (``check_graph``) :class:`tokenbus.schemas.errors.UnknownGraph` for a graph no
        live worker of the queue serves while some are live (see :meth:`check_graph`).
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
        return await self.enqueue_request(request, check_graph=check_graph)

    async def enqueue_request(self, request: JobRequest, *, check_graph: bool = False) -> str:
        """Enqueue a validated request; ``check_graph`` as for :meth:`enqueue`."""
        if check_graph and not self._served_recently(request.graph):
            await self.check_graph(request.graph)
        job_id = request.job_id or uuid.uuid4().hex
        if request.job_id is not None and await self._streams.exists(self._keys.job(job_id)):
            return job_id  # it ran, or runs: its stream is its idempotency record (TOKENBUS_JOB_TTL)
        job = await self._pool.enqueue_job(JOB_FUNCTION, request.to_arg(), _job_id=job_id, _queue_name=self._queue_name)
        if job is not None:  # None: the job was already queued (an idempotent enqueue)
            await self._announce(job_id, "is queued")
        return job_id

    async def _announce(self, job_id: str, what: str) -> None:
        """Wake the queue's workers: they poll at once (new jobs, and arq's abort requests, are
        seen by a poll) instead of at their next ``TOKENBUS_POLL_DELAY``."""
        try:
            await self._pool.publish(wake_channel(self._queue_name), b"")
        except redis_errors.ResponseError as e:  # no PUBLISH right, say: the request stands all the same
            logger.warning(
                "job %s %s, but announcing it on %s failed (%s): workers see it at their next poll",
                job_id, what, wake_channel(self._queue_name), e,
            )  # fmt: skip

    # -- workers -----------------------------------------------------------------------------------
    async def workers(self) -> list[WorkerInfo]:
        """The live workers of this client's queue (seen in their last three heartbeats)."""
        return await live_workers(self._streams, self._keys, queue=self._queue_name)

    async def check_graph(self, graph: str) -> list[WorkerInfo] | None:
        """The live workers of the queue, after checking that one serves ``graph``: raises
        :class:`UnknownGraph` (naming the graphs they serve) if some are live and none does. With
        none live, nothing is refused: a job waits in the queue until a worker starts. None if
        this client may not read the workers' records (an ACL user made before they existed)."""
        try:
            workers = await self.workers()
        except redis_errors.NoPermissionError as e:
            logger.debug("cannot read %s (%s): graph %s not checked", self._keys.workers, e, graph)
            return None
        served = frozenset(g for w in workers for g in w.graphs)
        self._served = (time.monotonic(), served)
        if workers and graph not in served:
            raise UnknownGraph(graph, sorted(served), served_by=f"the live workers of queue {self._queue_name} serve")
        return workers

    def _served_recently(self, graph: str) -> bool:
        """Whether a live worker served ``graph`` a moment ago (no need to ask again per job)."""
        checked, served = self._served
        return graph in served and time.monotonic() - checked < SERVED_CACHE_S

    @property
    def _readable(self) -> Redis:
        """The streams' client for the readers of :mod:`tokenbus.consumer`, typed (for now) for a
        single Redis: they read one stream per command, which a Redis Cluster routes as well."""
        return cast(Redis, self._streams)

    # -- jobs ----------------------------------------------------------------------------------------
    async def status(self, job_id: str) -> JobStatus:
        """Where the job is: queued, running (attempt, worker, entries so far) or how it ended.
        Raises :class:`UnknownJob` if Redis knows nothing of it."""
        status = await job_status(
            self._pool, job_id, keys=self._keys, queue_name=self._queue_name, streams=self._streams
        )
        if status is None:
            raise UnknownJob(job_id)
        return status

    async def jobs(self, *, limit: int = 20) -> JobList:
        """The running jobs, the first ``limit`` queued (by due time), the newest ``limit`` finished
        (of the last ``FINISHED_KEPT``), and the live workers."""
        return await list_jobs(
            self._pool, keys=self._keys, queue_name=self._queue_name, limit=limit, streams=self._streams
        )

    async def result(self, job_id: str, *, wait: bool = False) -> JobView:
        """What the job produced (its newest attempt): text per tag and per node, status, error.
        ``wait``: once it has ended. Raises :class:`UnknownJob` if Redis knows nothing of it."""
        view = await job_result(self._readable, job_id, prefix=self._prefix)
        if view.attempt == 0:
            await self.status(job_id)  # not started yet, or unknown: raises
        if wait and not view.done:
            view = await job_result(self._readable, job_id, prefix=self._prefix, wait=True)
        return view

    async def cancel(self, job_id: str, *, timeout_s: float | None = None) -> JobStatus:
        """Cancel a queued or running job (it ends ``cancelled``); with ``timeout_s``, wait that long
        for it to end. Returns its status (a job that had ended already is left as it was).
        Raises :class:`UnknownJob` if Redis knows nothing of it."""
        status = await self.status(job_id)
        if status.done:
            return status
        await self.abort(job_id)
        if timeout_s:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await job_result(self._readable, job_id, prefix=self._prefix, wait=True)
        return await self.status(job_id)

    # -- dead letters of consumer groups ----------------------------------------------------------
    async def dead_letters(self, *, group: str | None = None, count: int = 100) -> list[DeadLetter]:
        """The newest dead letters (of ``group``), newest first."""
        return await dead_letters(self._readable, self._keys, group=group, count=count)

    async def dead_letter(self, dead_id: str) -> DeadLetter | None:
        """One dead letter by its id in ``<prefix>:dead`` (None if there is none)."""
        return await dead_letter(self._readable, self._keys, dead_id)

    async def redrive(self, dead_ids: list[str]) -> dict[str, str]:
        """Hand dead letters back to their groups (see :func:`tokenbus.consumer.dead.redrive`)."""
        return await redrive(self._readable, self._keys, dead_ids)

    async def abort(self, job_id: str, *, timeout_s: float | None = None) -> bool:
        """Ask the worker running (or about to run) ``job_id`` to cancel it.

        With ``timeout_s``, wait that long for the job's final entry and return whether it was
        ``cancelled``; without, return True once the request is recorded. The job's model calls are
        cancelled and their HTTP streams closed.
        """
        await self._pool.zadd(abort_jobs_ss, {job_id: timestamp_ms()})
        await self._announce(job_id, "is to be aborted")
        if timeout_s is None:
            return True
        async with asyncio.timeout(timeout_s):
            view = await job_result(self._readable, job_id, prefix=self._prefix, wait=True)
        return view.status is EntryType.CANCELLED
