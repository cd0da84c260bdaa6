"""The worker's Prometheus metrics: a collector that reads the worker's own counts when scraped.

The worker counts in plain ints and buckets where things happen (:mod:`tokenbus.worker.stats`,
and attributes of the publisher, leases, sweeper, wake-ups and arq's worker); this collector
turns them into metric families at scrape time, on the metrics server's thread. Nothing on the
worker's hot path calls prometheus-client (a ``Counter.inc()`` per token takes a lock and a
label lookup, an ``int += 1`` does not). The queue's depth and whether Redis answers are asked
of Redis at scrape time, with a client of the scraping thread's own (:class:`RedisProbe`).
The README's "Operating tokenbus" table lists every metric.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis as SyncRedis
from redis import RedisCluster as SyncRedisCluster
from redis import exceptions as redis_errors
from redis.connection import parse_url
from redis.sentinel import Sentinel

from tokenbus.worker.redis_client import redis_url, streams_url
from tokenbus.worker.settings import Settings
from tokenbus.worker.stats import Buckets

if TYPE_CHECKING:
    from tokenbus.worker._arq import TokenbusWorker
    from tokenbus.worker.loop_lag import LoopMonitor
    from tokenbus.worker.resources import WorkerResources

PROBE_TIMEOUT_S = 2.0


class RedisProbe:
    """Redis as the metrics server's threads see it: blocking clients of their own (the queue's,
    and the streams' when they live apart), so that a health check answers even while the
    worker's event loop is stuck."""

    def __init__(self, settings: Settings, *, queue: str, running_key: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
        options: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        self._redis: SyncRedis
        if settings.sentinels is None:
            self._redis = SyncRedis.from_url(redis_url(settings), **options)
        else:
            url = parse_url(redis_url(settings))  # type: ignore[no-untyped-call]
            credentials = {name: url[name] for name in ("username", "password", "db") if name in url}
            sentinel = Sentinel(settings.sentinel_addresses, **credentials, **options)  # type: ignore[no-untyped-call]
            self._redis = sentinel.master_for(settings.sentinel_master)  # type: ignore[no-untyped-call]
            self._sentinels = sentinel.sentinels
        self._streams: SyncRedis | SyncRedisCluster = self._redis
        if settings.streams_cluster:
            self._streams = SyncRedisCluster.from_url(streams_url(settings), **options)
        elif settings.streams_url is not None:
            self._streams = SyncRedis.from_url(settings.streams_url, **options)
        self._queue = queue
        self._running_key = running_key

    _sentinels: list[SyncRedis] = []  # the Sentinels' clients, with TOKENBUS_SENTINELS

    def problem(self) -> str | None:
        """None if Redis answers a ``PING`` (each deployment), else what went wrong."""
        try:
            self._redis.ping()
            if self._streams is not self._redis:
                self._streams.ping()
        except (redis_errors.RedisError, OSError) as e:
            return f"{type(e).__name__}: {e}"
        return None

    def queue_depth(self) -> int:
        """Jobs due in the queue and not running on any worker: arq keeps a job in its queue while
        it runs, and every worker lists the jobs it runs in ``<prefix>:running``."""
        due = self._redis.zcount(self._queue, "-inf", int(time.time() * 1000))
        running = self._streams.zcard(self._running_key)
        return max(0, int(due) - int(running))  # type: ignore[arg-type]

    def close(self) -> None:
        if self._streams is not self._redis:
            self._streams.close()
        self._redis.close()
        for client in self._sentinels:
            client.close()


class WorkerCollector(Collector):
    """Every ``tokenbus_*`` metric of one worker process."""

    def __init__(
        self, worker: TokenbusWorker, resources: WorkerResources, monitor: LoopMonitor, probe: RedisProbe
    ) -> None:
        self._worker = worker
        self._resources = resources
        self._monitor = monitor
        self._probe = probe

    def collect(self) -> Iterator[Metric]:
        yield from self._jobs()
        yield from self._publishing()
        yield from self._redis()
        yield from self._loop()

    def _jobs(self) -> Iterator[Metric]:
        jobs = self._resources.jobs.snapshot()
        worker = self._worker
        started = CounterMetricFamily("tokenbus_jobs_started", "Job attempts started, by graph", labels=["graph"])
        for graph, count in sorted(jobs.started.items()):
            started.add_metric([graph], count)
        yield started
        finished = CounterMetricFamily(
            "tokenbus_jobs_finished",
            "Job attempts finished, by graph and status (end, error, cancelled; requeued: the job runs again)",
            labels=["graph", "status"],
        )
        for (graph, status), count in sorted(jobs.finished.items()):
            finished.add_metric([graph, status], count)
        yield finished
        not_run = CounterMetricFamily(
            "tokenbus_jobs_not_run",
            "Jobs closed without running: invalid (an envelope or id that cannot be used), "
            "arq (aborted before they started, out of tries, expired)",
            labels=["reason"],
        )
        not_run.add_metric(["invalid"], worker.jobs_unrunnable)
        not_run.add_metric(["arq"], worker.jobs_not_run)
        yield not_run
        yield _histogram(
            "tokenbus_job_duration_seconds", "Seconds from an attempt's start to its terminal entry, by graph",
            jobs.duration,
        )  # fmt: skip
        yield _histogram(
            "tokenbus_time_to_first_token_seconds",
            "Seconds from an attempt's start to its first chunk (token or custom payload), by graph",
            jobs.first_chunk,
        )
        chunks = CounterMetricFamily(
            "tokenbus_chunks_published",
            "Chunks jobs published to their job stream, by graph and type (token, custom); "
            "tag-stream copies are not counted, merged chunks count each",
            labels=["graph", "type"],
        )
        for (graph, kind), count in sorted(jobs.chunks.items()):
            chunks.add_metric([graph, kind], count)
        yield chunks
        running = self._resources.jobs.running
        yield GaugeMetricFamily("tokenbus_jobs_running", "Job attempts running on this worker", running)
        slots = worker.max_jobs
        yield GaugeMetricFamily("tokenbus_job_slots", "Jobs this worker runs at once (TOKENBUS_MAX_JOBS)", slots)
        yield GaugeMetricFamily(
            "tokenbus_job_slots_free", "Job slots free on this worker", max(0, worker.max_jobs - worker.job_counter)
        )
        sweeper = self._resources.sweeper
        swept = CounterMetricFamily(
            "tokenbus_sweeper_closed",
            "Attempts the sweeper closed because their worker stopped: retry (the job runs again), final",
            labels=["action"],
        )
        swept.add_metric(["retry"], sweeper.closed_retry)
        swept.add_metric(["final"], sweeper.closed_final)
        yield swept
        leases = worker.leases
        yield CounterMetricFamily(
            "tokenbus_leases_lost", "Job leases this worker found gone or taken (their attempts were stopped)",
            leases.lost if leases is not None else 0,
        )  # fmt: skip

    def _publishing(self) -> Iterator[Metric]:
        publisher = self._resources.publisher
        yield CounterMetricFamily(
            "tokenbus_entries_published",
            "Stream entries Redis accepted from this worker (every tag-stream copy counts)",
            publisher.entries_written,
        )
        yield CounterMetricFamily(
            "tokenbus_entries_lost",
            "Stream entries given up after TOKENBUS_PUBLISH_GIVE_UP of failures, or refused by Redis",
            publisher.entries_lost,
        )
        yield CounterMetricFamily(
            "tokenbus_entries_unacknowledged",
            "Stream entries Redis took but fewer than TOKENBUS_WAIT_REPLICAS replicas acknowledged in time",
            publisher.entries_unacknowledged,
        )
        yield CounterMetricFamily(
            "tokenbus_publish_retries", "Publish pipelines sent again after Redis failed them", publisher.retries
        )
        yield CounterMetricFamily(
            "tokenbus_cluster_redirects",
            "Stream commands sent again to another Redis Cluster node after MOVED or ASK (a slot moved or "
            "moving); 0 on one Redis",
            publisher.redirects,
        )
        yield CounterMetricFamily(
            "tokenbus_cluster_slot_table_reloads",
            "Times the publisher reloaded the Redis Cluster's slot table (after a redirect, or a node lost); "
            "0 on one Redis",
            publisher.slot_table_reloads,
        )
        yield CounterMetricFamily(
            "tokenbus_chunks_merged",
            "Chunks merged into the entry of the chunk before them while the publisher was congested "
            "(TOKENBUS_COALESCE=adaptive)",
            publisher.chunks_merged,
        )
        yield GaugeMetricFamily(
            "tokenbus_publish_buffered",
            "Entries waiting for the publisher's next pipeline (a chunk's tag-stream copies count once)",
            publisher.buffered,
        )
        yield _histogram(
            "tokenbus_publish_batch_commands", "Commands per publish pipeline", {"": publisher.batch_sizes}
        )
        yield _histogram(
            "tokenbus_publish_round_trip_seconds",
            "Seconds from sending a publish pipeline to its last reply",
            {"": publisher.round_trips},
        )

    def _redis(self) -> Iterator[Metric]:
        worker, resources = self._worker, self._resources
        wakeups = worker.wakeups
        errors = CounterMetricFamily(
            "tokenbus_redis_errors",
            "Redis calls that failed (unreachable, timed out, refused), by the worker's component",
            labels=["component"],
        )
        errors.add_metric(["publisher"], resources.publisher.failures)
        errors.add_metric(["leases"], worker.leases.renew_failures if worker.leases is not None else 0)
        errors.add_metric(["sweeper"], resources.sweeper.failures)
        errors.add_metric(["poll"], worker.poll_failures)
        errors.add_metric(["jobs"], worker.job_redis_failures)
        errors.add_metric(["wakeups"], wakeups.failures if wakeups is not None else 0)
        yield errors
        reconnects = CounterMetricFamily(
            "tokenbus_redis_reconnects",
            "Connections opened again after a failure: the publisher's, the wake-up subscription's",
            labels=["component"],
        )
        reconnects.add_metric(["publisher"], resources.publisher.reconnects)
        reconnects.add_metric(["wakeups"], max(0, wakeups.subscriptions - 1) if wakeups is not None else 0)
        yield reconnects
        try:
            depth: int | None = self._probe.queue_depth()
        except (redis_errors.RedisError, OSError):
            depth = None
        yield GaugeMetricFamily("tokenbus_redis_up", "1 if Redis answered this scrape", 0 if depth is None else 1)
        if depth is not None:
            yield GaugeMetricFamily(
                "tokenbus_queue_depth",
                "Jobs due in the queue and not running on any worker (the same on every worker of a queue)",
                depth,
            )

    def _loop(self) -> Iterator[Metric]:
        monitor = self._monitor
        yield _histogram(
            "tokenbus_event_loop_lag_seconds",
            f"How late the event loop ran a timer due every {monitor.interval_s:g}s",
            {"": monitor.lags},
        )
        yield GaugeMetricFamily(
            "tokenbus_event_loop_blocked_seconds",
            "How late the event loop is now (a loop stuck by a blocking call keeps growing this)",
            monitor.blocked_s(),
        )


def _histogram(name: str, documentation: str, by_graph: dict[str, Buckets]) -> HistogramMetricFamily:
    """A histogram family from :class:`Buckets`, labelled by graph unless the only key is ``""``."""
    labelled = list(by_graph) != [""]
    family = HistogramMetricFamily(name, documentation, labels=["graph"] if labelled else None)
    for graph, buckets in sorted(by_graph.items()):
        cumulative, total = buckets.cumulative()
        family.add_metric([graph] if labelled else [], cumulative, sum_value=total)
    return family
