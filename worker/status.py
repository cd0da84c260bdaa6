"""Where jobs are: queued, running (attempt, worker, entries so far) or how they ended.

Read from what workers keep anyway, so that no job pays for being watched: arq's job envelope
(graph, enqueue time), the queue (due time), the lease (``arq:in-progress:<id>``, whose token
names the worker holding it), the abort set, the newest and first entries of the job stream, and
two keys kept for operators: ``<prefix>:finished`` (the newest finished jobs, written with their
final entry) and ``<prefix>:workers`` (live workers, see :mod:`tokenbus.worker.presence`).

Light: no LangGraph (clients and the gateway use it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import orjson
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix
from redis.asyncio import Redis

from tokenbus.consumer.reader import as_text
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.schemas.errors import MalformedEntry
from tokenbus.schemas.keys import StreamKeys, validate_job_id
from tokenbus.worker.presence import WorkerInfo, holder_of, live_workers, worker_records
from tokenbus.worker.redis_client import StreamsRedis

logger = logging.getLogger(__name__)


class JobState(StrEnum):
    QUEUED = "queued"
    """Waiting for a worker: not started, due later (deferred), or waiting to run again."""
    RUNNING = "running"
    """An attempt has started and the job has not ended."""
    END = "end"
    ERROR = "error"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset({JobState.END, JobState.ERROR, JobState.CANCELLED})


@dataclass
class JobStatus:
    """One job, as far as Redis tells."""

    job: str
    state: JobState
    graph: str | None = None
    attempt: int = 0
    """The newest attempt written to the job stream (0: none has started)."""
    entries: int = 0
    """Entries of that attempt so far, its ``start`` and terminal entries left out (chunks, and
    state entries in ``updates``/``values`` modes)."""
    worker: str | None = None
    """``host:pid`` of the worker holding the job (its lease), if any; its id if that worker
    has no record."""
    enqueued_ms: int | None = None
    due_ms: int | None = None
    """When queued: when it is due (later than now: deferred, or waiting to run again)."""
    last_entry_ms: int | None = None
    ended_ms: int | None = None
    error: str = ""
    error_type: str = ""
    cancel_requested: bool = False

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.value}


@dataclass
class JobList:
    """The jobs of one queue: running, queued (the first ones due) and the newest finished."""

    running: list[JobStatus]
    queued: list[JobStatus]
    queued_total: int
    finished: list[JobStatus]
    finished_total: int
    workers: list[WorkerInfo] = field(default_factory=list)
    """Live workers of the queue."""


async def job_statuses(
    redis: Redis,
    job_ids: Sequence[str],
    *,
    keys: StreamKeys,
    queue_name: str,
    streams: StreamsRedis | None = None,
) -> list[JobStatus | None]:
    """The status of each job (None for an id Redis knows nothing of), in two round trips to
    each deployment: ``redis`` the queue's, ``streams`` the streams' (default: the same)."""
    for job_id in job_ids:
        validate_job_id(job_id)
    if not job_ids:
        return []
    streams = redis if streams is None else streams
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.get(job_key_prefix + job_id)
            pipe.zscore(queue_name, job_id)
            pipe.get(in_progress_key_prefix + job_id)
            pipe.zscore(abort_jobs_ss, job_id)
        queued = await pipe.execute()
    async with streams.pipeline(transaction=False) as pipe:  # per node, on a Redis Cluster
        for job_id in job_ids:
            pipe.xrevrange(keys.job(job_id), count=1)
            pipe.xrange(keys.job(job_id), count=1)
        streamed = await pipe.execute()
    holders = [holder_of(lease) for lease in queued[2::4]]
    names = {w.id: w.name for w in await worker_records(streams, keys)} if any(holders) else {}
    statuses = []
    for i, job_id in enumerate(job_ids):
        envelope, due, lease, cancel = queued[i * 4 : i * 4 + 4]
        newest, first = streamed[i * 2 : i * 2 + 2]
        holder = holders[i]
        statuses.append(
            _status(
                job_id, envelope=envelope, due=due, holder=None if holder is None else names.get(holder, holder),
                held=bool(lease), cancel=cancel is not None,
                newest=_entry(keys, job_id, newest), first=_entry(keys, job_id, first),
            )
        )  # fmt: skip
    return statuses


async def job_status(
    redis: Redis, job_id: str, *, keys: StreamKeys, queue_name: str, streams: StreamsRedis | None = None
) -> JobStatus | None:
    """The status of one job; None if Redis knows nothing of it (never enqueued, or expired)."""
    [status] = await job_statuses(redis, [job_id], keys=keys, queue_name=queue_name, streams=streams)
    return status


async def list_jobs(
    redis: Redis, *, keys: StreamKeys, queue_name: str, limit: int = 20, streams: StreamsRedis | None = None
) -> JobList:
    """Running jobs, the first ``limit`` queued by due time, and the newest ``limit`` finished
    (``streams`` as for :func:`job_statuses`)."""
    streams = redis if streams is None else streams
    async with streams.pipeline(transaction=False) as pipe:
        pipe.zrange(keys.running, 0, -1)
        pipe.zrevrange(keys.finished, 0, max(limit - 1, 0))
        pipe.zcard(keys.finished)
        running_ids, finished_ids, finished_total = await pipe.execute()
    queue_size = await redis.zcard(queue_name)
    # arq keeps a running job in the queue until it ends: look past those for the queued ones
    queue_ids = await redis.zrange(queue_name, 0, limit + len(running_ids) - 1) if limit else []
    ids = list(dict.fromkeys(as_text(i) for i in [*running_ids, *queue_ids, *finished_ids]))
    found = await job_statuses(redis, ids, keys=keys, queue_name=queue_name, streams=streams)
    statuses = [s for s in found if s is not None]
    by_id = {s.job: s for s in statuses}
    running = sorted((s for s in statuses if s.state is JobState.RUNNING), key=lambda s: s.enqueued_ms or 0)
    queued = sorted((s for s in statuses if s.state is JobState.QUEUED), key=lambda s: s.due_ms or 0)
    finished = [by_id[i] for i in (as_text(j) for j in finished_ids) if i in by_id and by_id[i].done]
    running_in_queue = sum(1 for s in statuses if s.due_ms is not None and s.state is not JobState.QUEUED)
    return JobList(
        running=running[:limit] if limit else running, queued=queued[:limit],
        queued_total=max(len(queued), queue_size - running_in_queue), finished=finished,
        finished_total=finished_total, workers=await live_workers(streams, keys, queue=queue_name),
    )  # fmt: skip


def _entry(keys: StreamKeys, job_id: str, reply: list[Any]) -> Entry | None:
    if not reply:
        return None
    entry_id, fields = reply[0]
    try:
        return Entry.decode(fields, id=as_text(entry_id), stream=keys.job(job_id))
    except MalformedEntry:
        return None


def _status(
    job_id: str, *, envelope: bytes | None, due: float | None, holder: str | None, held: bool, cancel: bool,
    newest: Entry | None, first: Entry | None,
) -> JobStatus | None:  # fmt: skip
    graph, enqueued_ms = _from_envelope(envelope)
    if graph is None and first is not None and first.type is EntryType.START:
        try:
            graph = (first.data or {}).get("graph")
        except (MalformedEntry, AttributeError):
            graph = None
    status = JobStatus(
        job_id, JobState.QUEUED, graph=graph, enqueued_ms=enqueued_ms, worker=holder,
        due_ms=None if due is None else int(due), cancel_requested=cancel,
    )  # fmt: skip
    if newest is not None:
        status.attempt, status.last_entry_ms = newest.attempt, newest.ts
        status.entries = max(0, newest.next_seq - 1 - (1 if newest.is_terminal else 0))
    if newest is not None and newest.is_final:
        status.state, status.ended_ms = JobState(newest.type.value), newest.ts
        status.error, status.error_type = newest.error, newest.error_type
    elif held or (newest is not None and not newest.is_terminal and due is None):
        status.state = JobState.RUNNING  # held by a worker (or its worker stopped: the sweeper closes it)
    elif due is None and envelope is None:
        return None if newest is None else status  # an attempt ended to run again, but arq has let it go
    return status


def _from_envelope(envelope: bytes | None) -> tuple[str | None, int | None]:
    """The graph and enqueue time (ms) in arq's job envelope, when it is one tokenbus reads."""
    if envelope is None:
        return None, None
    try:
        job = orjson.loads(envelope)
        request = job["a"][0]
        if isinstance(request, str):
            request = orjson.loads(request)
        graph = request.get("graph") if isinstance(request, dict) else None
        enqueued = job.get("et")
        return (graph if isinstance(graph, str) else None), (enqueued if isinstance(enqueued, int) else None)
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return None, None


def age_s(ms: int | None, now_ms: float | None = None) -> float | None:
    """Seconds since ``ms`` (an epoch time in ms)."""
    if ms is None:
        return None
    return ((time.time() * 1000 if now_ms is None else now_ms) - ms) / 1000
