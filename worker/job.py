"""The arq job: run one graph request and stream everything it produces (one attempt)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from schemas.entries import EntryType
from schemas.errors import TokenbusError
from schemas.job import JobRequest
from worker.emitter import JobEmitter, Outcome
from worker.orphans import close_attempt, running_key
from worker.resources import WorkerResources
from worker.streaming import stream_graph

logger = logging.getLogger(__name__)

RESOURCES = "tokenbus"
"""Key of the :class:`WorkerResources` in arq's ``ctx``."""
TERMINAL_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0)


class JobFailed(TokenbusError):
    """Raised to arq after the job's ``error`` entry is written, so arq records a failure."""


async def run_graph(ctx: dict[str, Any], request: Any) -> dict[str, Any]:
    resources: WorkerResources = ctx[RESOURCES]
    job_id: str = ctx["job_id"]
    attempt = int(ctx["job_try"])
    if attempt > 1:  # a killed worker left the previous attempt open: close it first
        await close_attempt(
            resources.redis, resources.keys, resources.limits, job_id, retry=True,
            reason=f"attempt {{attempt}} was interrupted (its worker stopped); attempt {attempt} follows",
        )  # fmt: skip
    emitter = resources.emitter(job_id, attempt)
    resources.sweeper.running.add(job_id)
    resources.publisher.command(emitter.sink, ("ZADD", running_key(resources.keys), time.time() * 1000, job_id))
    emitter.start({"graph": request.get("graph") if isinstance(request, dict) else None})
    started = time.monotonic()
    outcome = Outcome(EntryType.CANCELLED, "the job was interrupted", "CancelledError", retry=True)
    try:
        outcome = await _run(resources, emitter, request)
    except asyncio.CancelledError:
        worker = ctx.get("worker")
        if worker is not None and job_id in worker.aborting_tasks:
            outcome = Outcome(EntryType.CANCELLED, "the job was aborted", "CancelledError")
        else:
            outcome = Outcome(
                EntryType.CANCELLED, "the worker shut down; the job will run again", "CancelledError", retry=True
            )
        raise
    finally:
        elapsed_ms = round((time.monotonic() - started) * 1000)
        terminal = resources.track(_write_terminal(resources, emitter, outcome, elapsed_ms))
        outcome = await asyncio.shield(terminal)  # a cancelled job still writes it; shutdown waits for it
        logger.info("job %s attempt %d: %s after %d chunks", job_id, attempt, outcome.type, emitter.chunks)
    if outcome.type is EntryType.ERROR:
        raise JobFailed(outcome.error)
    return {"status": outcome.type.value, "chunks": emitter.chunks, "attempt": attempt}


async def _write_terminal(
    resources: WorkerResources, emitter: JobEmitter, outcome: Outcome, elapsed_ms: int
) -> Outcome:
    """Write the terminal entry, retrying past the publisher's give-up until Redis takes it.

    If entries of the job were lost on the way, an ``end`` becomes an ``error`` that says how many.
    The sweeper closes the attempt if even this fails (the worker dies, or Redis never returns).
    """
    sink = emitter.sink
    backoff = iter(TERMINAL_BACKOFF_S)
    while True:
        if sink.lost and outcome.type is EntryType.END:
            outcome = Outcome(EntryType.ERROR, str(sink.failure()), "PublishError")
        lost_before = sink.lost
        emitter.finish(outcome, {"elapsed_ms": elapsed_ms, "lost": sink.lost})
        resources.publisher.command(sink, ("ZREM", running_key(resources.keys), emitter.job_id))
        await sink.flushed()
        if sink.lost == lost_before or (delay := next(backoff, None)) is None:
            break
        await asyncio.sleep(delay)  # the terminal entry itself was lost: Redis is still away
    resources.sweeper.running.discard(emitter.job_id)
    return outcome


async def _run(resources: WorkerResources, emitter: JobEmitter, raw: Any) -> Outcome:
    """Validate and run the request; any failure becomes an ``error`` outcome naming the cause."""
    settings = resources.settings
    timeout = settings.job_timeout_s
    deadline: asyncio.Timeout | None = None
    try:
        request = JobRequest.parse(raw, max_bytes=settings.max_request_bytes)
        if request.tags is not None:
            emitter.tag_filter = frozenset(request.tags)
        graph = resources.registry.get(request.graph)
        timeout = min(request.timeout_s or settings.job_timeout_s, settings.max_job_timeout_s)
        deadline = asyncio.timeout(timeout)
        async with deadline:
            await stream_graph(graph, request, emitter, resources.publisher)
        await emitter.sink.flushed()
        emitter.sink.check()
    except TimeoutError as e:
        if deadline is None or not deadline.expired():
            return _error_outcome(emitter, e)
        return Outcome(EntryType.ERROR, f"the job ran longer than its timeout of {timeout:g}s", "JobTimeout")
    except Exception as e:
        return _error_outcome(emitter, e)
    return Outcome(EntryType.END)


def _error_outcome(emitter: JobEmitter, error: BaseException) -> Outcome:
    if isinstance(error, TokenbusError):
        message = str(error)
    else:
        message = f"{type(error).__name__}: {error}"
        root = _root_cause(error)
        if root is not error and str(root) not in message:
            message += f" (caused by {type(root).__name__}: {root})"
        logger.warning("job %s attempt %d failed: %s", emitter.job_id, emitter.attempt, message, exc_info=error)
    return Outcome(EntryType.ERROR, message, type(error).__name__)


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain (an HTTP client's wrapped transport error, say)."""
    seen = {id(error)}
    while (cause := error.__cause__ or error.__context__) is not None and id(cause) not in seen:
        seen.add(id(cause))
        error = cause
    return error
