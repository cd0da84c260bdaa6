"""The arq worker of tokenbus: settings in, a ready :class:`arq.worker.Worker` out."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Worker, func
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from tokenbus.schemas.job import JOB_FUNCTION
from tokenbus.worker._arq import TokenbusWorker
from tokenbus.worker.job import LEASES, RESOURCES, run_graph
from tokenbus.worker.lease import Leases
from tokenbus.worker.presence import Presence
from tokenbus.worker.redis_client import arq_sentinel_pool, arq_settings
from tokenbus.worker.resources import WorkerResources
from tokenbus.worker.serializer import job_deserializer, job_serializer
from tokenbus.worker.settings import Settings

logger = logging.getLogger(__name__)

METRICS = "tokenbus_metrics"
"""Key of the worker's :class:`tokenbus.worker.health.MetricsServer` in arq's ``ctx`` (when
``TOKENBUS_METRICS_PORT`` is set)."""


def hard_timeout_s(settings: Settings) -> float:
    """arq's own limit: above the longest per-job timeout plus the time a terminal entry may take
    to write through a Redis outage, so the job's timeout fires first and writes its entry."""
    return settings.max_job_timeout_s + settings.publish_give_up_s + 2.0


PRESENCE = "tokenbus_presence"
"""Key of the worker's :class:`tokenbus.worker.presence.Presence` in arq's ``ctx``."""
STARTUP_WAIT_S = 60
"""Seconds a starting worker waits for Redis to come up (arq retries its connection each second)."""
SHUTDOWN_MARGIN_S = 10.0
"""How long after a shutdown's cancellation a worker waits for its jobs' terminal entries, on
top of the time the publisher may retry them (``TOKENBUS_PUBLISH_GIVE_UP``)."""


GC_THRESHOLDS = (50_000, 20, 100)
"""The cyclic garbage collector's thresholds in a worker (Python's defaults: 700, 10, 10)."""


def tune_gc() -> None:
    """Garbage collection for a process that streams tokens. Everything loaded so far (LangChain,
    LangGraph, the graphs) lives as long as the worker: it is frozen out of the collector's passes.
    Token streams allocate a few dozen objects per chunk, and with Python's default thresholds the
    collector runs every 700 allocations over everything young, over and over: with many streams
    at once, a large part of each chunk's CPU (BENCHMARKS.md). Cycles are still collected, in
    larger and fewer passes."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def arq_redis_settings(settings: Settings) -> RedisSettings:
    """arq's connection (:func:`arq_settings`), retrying through a Redis restart instead of
    stopping the worker."""
    redis_settings = arq_settings(settings)
    redis_settings.retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=40)
    redis_settings.retry_on_error = [redis_errors.ConnectionError, redis_errors.TimeoutError]
    redis_settings.conn_retries = STARTUP_WAIT_S  # a worker started before Redis waits for it, a second apart
    return redis_settings


def build_worker(
    settings: Settings,
    *,
    burst: bool = False,
    handle_signals: bool = True,
    poll_delay_s: float | None = None,
) -> Worker:
    """An arq worker running ``run_graph`` jobs from ``settings.queue_name``: it polls the queue
    when a client announces a job and at least every ``poll_delay_s`` (default:
    ``settings.poll_delay_s``; 0 polls without pause, as burst workers in tests do).

    Jobs are JSON (never pickle), every job has a finite timeout, and a job interrupted by a
    shutdown (SIGTERM, after ``shutdown_grace_s``) is re-queued and runs again as a new attempt.
    """

    async def startup(ctx: dict[str, Any]) -> None:
        resources = ctx[RESOURCES] = await WorkerResources.open(settings)
        worker.leases = ctx[LEASES] = Leases(
            resources.queue, lease_s=settings.lease, renew_every_s=settings.heartbeat_s, on_lost=worker.job_lost
        ).start()
        resources.publisher.fence = worker.leases
        if settings.metrics_port is not None:
            from tokenbus.worker.health import MetricsServer

            ctx[METRICS] = await MetricsServer.start(worker, resources)
        presence = ctx[PRESENCE] = Presence(
            resources.redis, settings.keys, worker_id=worker.leases.holder, queue=settings.queue_name,
            graphs=resources.registry.names, max_jobs=settings.max_jobs, heartbeat_s=settings.heartbeat_s,
            running=lambda: len(resources.sweeper.running),
        )  # fmt: skip
        try:
            await presence.beat()  # enqueuers know the graphs from now on
            presence.start()
        except redis_errors.NoPermissionError as e:
            presence.refused(e)
        logger.info("worker serves graphs: %s", ", ".join(resources.registry.names))
        tune_gc()

    async def shutdown(ctx: dict[str, Any]) -> None:
        presence: Presence | None = ctx.pop(PRESENCE, None)
        if presence is not None:
            await presence.close()
        metrics = ctx.pop(METRICS, None)
        if metrics is not None:
            await metrics.close()
        leases: Leases | None = ctx.pop(LEASES, None)
        if leases is not None:
            await leases.close()  # stops renewing; the publisher's last batches may still confirm
        resources: WorkerResources | None = ctx.pop(RESOURCES, None)
        if resources is not None:
            await resources.close()

    ctx: dict[str, Any] = {"settings": settings}
    worker = TokenbusWorker(
        functions=[func(run_graph, name=JOB_FUNCTION, timeout=hard_timeout_s(settings), max_tries=settings.max_tries)],
        queue_name=settings.queue_name,
        redis_settings=arq_redis_settings(settings),
        redis_pool=None
        if settings.sentinels is None
        else arq_sentinel_pool(settings, job_deserializer=job_deserializer),
        on_startup=startup,
        on_shutdown=shutdown,
        ctx=ctx,
        burst=burst,
        handle_signals=handle_signals,
        poll_delay_s=settings.poll_delay_s if poll_delay_s is None else poll_delay_s,
        shutdown_margin_s=settings.publish_give_up_s + SHUTDOWN_MARGIN_S,
        max_jobs=settings.max_jobs,
        job_timeout=hard_timeout_s(settings),
        job_completion_wait=settings.shutdown_grace_s,
        allow_abort_jobs=True,
        keep_result=3600,
        job_serializer=job_serializer,
        job_deserializer=job_deserializer,
    )
    ctx["worker"] = worker  # the job asks it whether a cancellation was an abort
    return worker


async def stop_worker(worker: Worker, task: asyncio.Task[None], *, grace_s: float = 10.0) -> None:
    """Stop an in-process worker started with ``handle_signals=False``: let jobs that are
    finishing (arq records their results after they return) complete, then close it."""
    running = [t for t in worker.tasks.values() if not t.done()]
    if running:
        await asyncio.wait(running, timeout=grace_s)
    await worker.close()  # cancels what is left, and the worker's main task
    await asyncio.gather(task, return_exceptions=True)
