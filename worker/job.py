"""The arq job: run one graph request and stream everything it produces (one attempt)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from tokenbus.schemas.entries import EntryType, ErrorType
from tokenbus.schemas.errors import InvalidJobRequest, TokenbusError
from tokenbus.schemas.job import JobRequest, is_valid_graph_name
from tokenbus.worker.emitter import JobEmitter, Outcome
from tokenbus.worker.lease import Leases
from tokenbus.worker.log_context import bind_job
from tokenbus.worker.orphans import close_attempt, newest_entry
from tokenbus.worker.resources import WorkerResources
from tokenbus.worker.streaming import stream_graph

logger = logging.getLogger(__name__)

RESOURCES = "tokenbus"
"""Key of the :class:`WorkerResources` in arq's ``ctx``."""
LEASES = "tokenbus_leases"
"""Key of the worker's :class:`tokenbus.worker.lease.Leases` in arq's ``ctx``."""
TERMINAL_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


class JobFailed(TokenbusError):
    """Raised to arq after the job's ``error`` entry is written, so arq records a failure."""


async def run_graph(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """One attempt of a job: ``args`` is the job request (one JSON object). Anything else in the
    envelope fails the job with an ``error`` entry, as a bad request does."""
    resources: WorkerResources = ctx[RESOURCES]
    job_id: str = ctx["job_id"]
    last = await newest_entry(resources.redis, resources.keys, job_id)
    if last is not None and last.is_final:
        # ended already: arq re-queued it as it ended (a shutdown), or the id was enqueued again
        logger.warning("job %s ended already (attempt %d: %s); not running it again", job_id, last.attempt, last.type)
        return {"status": "ended-already", "attempt": last.attempt}
    attempt = int(ctx["job_try"])
    if last is not None:
        attempt = max(attempt, last.attempt + 1)  # arq's count restarts once its retry key expires
        if not last.is_terminal:  # a killed worker left the previous attempt open: close it first
            await close_attempt(
                resources.redis, resources.keys, resources.limits, job_id, retry=True,
                reason=f"attempt {{attempt}} was interrupted (its worker stopped); attempt {attempt} follows",
            )  # fmt: skip
    request: Any = args[0] if len(args) == 1 and not kwargs else _Envelope(len(args), sorted(kwargs))
    graph = _graph_name(request)
    bind_job(job_id=job_id, attempt=attempt, graph=graph)  # this job's log lines carry them
    emitter = resources.emitter(job_id, attempt)
    leases: Leases | None = ctx.get(LEASES)
    if leases is not None:
        leases.attach(job_id, emitter.sink, int(ctx["job_try"]))
    resources.sweeper.running.add(job_id)
    resources.publisher.command(emitter.sink, ("ZADD", resources.keys.running, time.time() * 1000, job_id))
    emitter.start({"graph": graph})
    resources.jobs.job_started(resources.jobs.graph_label(graph), emitter)
    started = time.monotonic()
    outcome = Outcome(EntryType.CANCELLED, "the job was interrupted", ErrorType.CANCELLED, retry=True)
    try:
        outcome = await _run(resources, emitter, request)
    except asyncio.CancelledError:
        worker = ctx.get("worker")
        if worker is not None and job_id in worker.aborting_tasks:
            outcome = Outcome(EntryType.CANCELLED, "the job was aborted", ErrorType.CANCELLED)
        elif emitter.sink.fenced:
            outcome = Outcome(EntryType.CANCELLED, "this worker lost the job's lease", ErrorType.LEASE_LOST, retry=True)
        else:
            outcome = Outcome(
                EntryType.CANCELLED, "the worker shut down; the job will run again", ErrorType.CANCELLED, retry=True
            )
        raise
    finally:
        elapsed_ms = round((time.monotonic() - started) * 1000)
        terminal = resources.track(_write_terminal(resources, emitter, outcome, elapsed_ms))
        try:
            outcome = await _until_done(terminal)
        finally:
            resources.jobs.job_finished(emitter, _status(terminal, outcome), time.monotonic() - started)
        logger.info("job %s attempt %d: %s after %d chunks", job_id, attempt, outcome.type, emitter.chunks)
    if outcome.type is EntryType.ERROR:
        raise JobFailed(outcome.error)
    return {"status": outcome.type.value, "chunks": emitter.chunks, "attempt": attempt}


async def _until_done(terminal: asyncio.Task[Outcome]) -> Outcome:
    """Wait for the terminal entry even through cancellations (a shutdown's grace ending as the
    job ends), then pass a cancellation on: arq then decides with the entry written, and
    :meth:`tokenbus.worker.app.TokenbusWorker.finish_job` sees that the job has ended."""
    cancelled = False
    while True:
        try:
            outcome = await asyncio.shield(terminal)
        except asyncio.CancelledError:
            if terminal.cancelled():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return outcome


def _status(terminal: asyncio.Task[Outcome], outcome: Outcome) -> str:
    """The ``status`` label of a finished attempt: its terminal entry's type, or ``requeued`` for
    an attempt that will run again (the worker shut down, or lost the job's lease)."""
    if terminal.done() and not terminal.cancelled() and terminal.exception() is None:
        outcome = terminal.result()
    return "requeued" if outcome.retry else outcome.type.value


class _Envelope:
    """A job envelope whose arguments are not the one request ``run_graph`` takes."""

    def __init__(self, args: int, kwargs: list[str]) -> None:
        self.args, self.kwargs = args, kwargs

    def problem(self) -> str:
        extra = f" and keyword arguments {', '.join(kwargs)[:200]}" if (kwargs := self.kwargs) else ""
        given = f"{self.args} positional arguments{extra}"
        return f"invalid job: run_graph takes one argument, the job request ('a': [request], 'k': {{}}); got {given}"


def _graph_name(request: Any) -> str | None:
    """The request's graph name for the ``start`` entry, if it is one (it is validated later)."""
    graph = request.get("graph") if isinstance(request, dict) else None
    return graph if isinstance(graph, str) and is_valid_graph_name(graph) else None


async def _write_terminal(
    resources: WorkerResources, emitter: JobEmitter, outcome: Outcome, elapsed_ms: int
) -> Outcome:
    """Write the terminal entry, retrying past the publisher's give-up until Redis takes it.

    If entries of the job were lost on the way (or, with ``TOKENBUS_WAIT_REPLICAS``, not
    acknowledged by enough replicas), an ``end`` becomes an ``error`` that says how many.
    A terminal entry lost, or refused for now (``OOM`` at ``maxmemory``, say: :func:`may_pass`), is
    written again, with backoff, for about 15 s more; one refused for good (``WRONGTYPE``: a tag's
    key holds something else) is not, as it would only be refused again. The sweeper closes the
    attempt if even this fails (the worker dies, or Redis never returns, or stays full): the job
    leaves ``<prefix>:running`` only once its terminal entry is written where it can be, so a job
    whose end no stream took stays there, its heartbeat stopped, until a sweeper writes it.
    """
    sink = emitter.sink
    backoff = iter(TERMINAL_BACKOFF_S)
    while True:
        if (sink.lost or sink.refused or sink.unacked) and outcome.type is EntryType.END:  # (its result is dropped)
            outcome = Outcome(EntryType.ERROR, str(sink.failure()), ErrorType.PUBLISH_ERROR)
        lost_before, transient_before = sink.lost, sink.transient
        summary: dict[str, int] = {"elapsed_ms": elapsed_ms, "lost": sink.lost + sink.refused}
        if resources.publisher.wait_replicas:
            summary["unacknowledged"] = sink.unacked
        emitter.finish(outcome, summary)
        await sink.flushed()
        # written where it can be: nothing lost, nothing refused that a later try might get in
        done = sink.lost == lost_before and sink.transient == transient_before
        if done or sink.fenced or (delay := next(backoff, None)) is None:
            break
        await asyncio.sleep(delay)  # the terminal entry itself was lost or refused for now: try again
    resources.sweeper.running.discard(emitter.job_id)
    if done and not sink.fenced:  # (a fenced attempt's job is another worker's to list)
        resources.publisher.command(sink, ("ZREM", resources.keys.running, emitter.job_id))
        await sink.flushed()  # before arq may queue the job again (retry): the next attempt lists it anew
    if done and not outcome.retry and not sink.fenced:
        resources.ended.add(emitter.job_id)
        emitter.record_finished()
    return outcome


async def _run(resources: WorkerResources, emitter: JobEmitter, raw: Any) -> Outcome:
    """Validate and run the request; any failure becomes an ``error`` outcome naming the cause."""
    settings = resources.settings
    timeout = settings.job_timeout_s
    deadline: asyncio.Timeout | None = None
    try:
        if isinstance(raw, _Envelope):
            raise InvalidJobRequest(raw.problem())
        request = JobRequest.parse(raw, max_bytes=settings.max_request_bytes)
        if request.tags is not None:
            emitter.tag_filter = frozenset(request.tags)
        graph = resources.registry.get(request.graph)
        timeout = min(request.timeout_s or settings.job_timeout_s, settings.max_job_timeout_s)
        deadline = asyncio.timeout(timeout)
        async with deadline:
            final = await stream_graph(graph, request, emitter, resources.publisher)
        await emitter.sink.flushed()
        emitter.sink.check()
        result = emitter.state_json(final)
    except TimeoutError as e:
        if deadline is None or not deadline.expired():
            return _error_outcome(emitter, e)
        return Outcome(EntryType.ERROR, f"the job ran longer than its timeout of {timeout:g}s", ErrorType.JOB_TIMEOUT)
    except Exception as e:
        return _error_outcome(emitter, e)
    return Outcome(EntryType.END, result=result)


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
