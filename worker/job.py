"""The arq job: run one graph request and stream everything it produces (one attempt)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from langchain_core.runnables import RunnableConfig

from schemas.entries import EntryType
from schemas.errors import TokenbusError
from schemas.job import JobRequest
from worker.emitter import JobEmitter, Outcome
from worker.registry import Graph
from worker.resources import WorkerResources

logger = logging.getLogger(__name__)

RESOURCES = "tokenbus"
"""Key of the :class:`WorkerResources` in arq's ``ctx``."""


class JobFailed(TokenbusError):
    """Raised to arq after the job's ``error`` entry is written, so arq records a failure."""


async def run_graph(ctx: dict[str, Any], request: Any) -> dict[str, Any]:
    resources: WorkerResources = ctx[RESOURCES]
    job_id: str = ctx["job_id"]
    emitter = resources.emitter(job_id, int(ctx["job_try"]))
    graph_name = request.get("graph") if isinstance(request, dict) else None
    emitter.start({"graph": graph_name})
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
                EntryType.CANCELLED,
                "the worker shut down; the job will run again",
                "CancelledError",
                retry=True,
            )
        raise
    finally:
        emitter.finish(outcome, {"elapsed_ms": round((time.monotonic() - started) * 1000)})
        await asyncio.shield(emitter.sink.flushed())
        logger.info(
            "job %s attempt %d: %s after %d chunks", job_id, emitter.attempt, outcome.type, emitter.chunks
        )
    if outcome.type is EntryType.ERROR:
        raise JobFailed(outcome.error)
    return {"status": outcome.type.value, "chunks": emitter.chunks, "attempt": emitter.attempt}


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
            await _stream(graph, request, emitter, resources)
        emitter.sink.check()
    except TimeoutError as e:
        if deadline is None or not deadline.expired():
            return _error_outcome(emitter, e)
        return Outcome(EntryType.ERROR, f"the job ran longer than its timeout of {timeout:g}s", "JobTimeout")
    except Exception as e:
        return _error_outcome(emitter, e)
    return Outcome(EntryType.END)


async def _stream(graph: Graph, request: JobRequest, emitter: JobEmitter, resources: WorkerResources) -> None:
    config: RunnableConfig = {
        "configurable": {
            **request.config,
            "tokenbus_job_id": emitter.job_id,
            "tokenbus_attempt": emitter.attempt,
            "tokenbus_modes": request.modes,
        }
    }
    publisher = resources.publisher
    message, custom = emitter.message, emitter.custom
    async for namespace, mode, chunk in graph.astream(
        request.input, config, stream_mode=list(request.modes), subgraphs=True
    ):
        if mode == "messages":
            message(*chunk)
        else:
            custom(chunk, tuple(namespace))
        if publisher.congested:
            await publisher.wait_writable()


def _error_outcome(emitter: JobEmitter, error: BaseException) -> Outcome:
    if isinstance(error, TokenbusError):
        message = str(error)
    else:
        message = f"{type(error).__name__}: {error}"
        root = _root_cause(error)
        if root is not error and str(root) not in message:
            message += f" (caused by {type(root).__name__}: {root})"
        logger.warning(
            "job %s attempt %d failed: %s", emitter.job_id, emitter.attempt, message, exc_info=error
        )
    return Outcome(EntryType.ERROR, message, type(error).__name__)


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain (an HTTP client's wrapped transport error, say)."""
    seen = {id(error)}
    while (cause := error.__cause__ or error.__context__) is not None and id(cause) not in seen:
        seen.add(id(cause))
        error = cause
    return error
