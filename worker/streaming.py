"""How a job's chunks are taken from LangGraph and handed to its emitter.

A job that asks for ``messages`` alone runs with LangGraph's own ``messages``-mode callback handler
(the one behind ``astream(stream_mode="messages")``: the same chunks and metadata, the same
``nostream``, node-output and subgraph rules), and each token is emitted from the model's callback
instead of through ``astream``'s queue. That saves LangGraph's queue hop per chunk and, above all,
lets the model pause for the publisher where it makes tokens: a model that never suspends (one
that answers from memory) is published while it runs rather than after, and a congested publisher
holds the model back (BENCHMARKS.md). Jobs that ask for ``custom`` payloads go through
``astream``, which keeps payloads and tokens in the order the graph made them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, cast
from uuid import UUID

from langchain_core.messages import BaseMessageChunk
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.runnables import RunnableConfig
from langgraph.pregel._messages import StreamMessagesHandler

from schemas.job import JobRequest
from worker.emitter import JobEmitter
from worker.publisher import Publisher
from worker.registry import Graph


async def stream_graph(graph: Graph, request: JobRequest, emitter: JobEmitter, publisher: Publisher) -> None:
    """Run ``graph`` on the request's input and emit every chunk of the request's modes."""
    config: RunnableConfig = {
        "configurable": {
            **request.config,
            "tokenbus_job_id": emitter.job_id,
            "tokenbus_attempt": emitter.attempt,
            "tokenbus_modes": request.modes,
        }
    }
    if request.modes == ("messages",):
        tokens = _TokenHandler(emitter, publisher)
        config["callbacks"] = [tokens]
        await graph.ainvoke(request.input, config)
        tokens.check()
        return
    message, custom, sink = emitter.message, emitter.custom, emitter.sink
    async for namespace, mode, chunk in graph.astream(
        request.input, config, stream_mode=list(request.modes), subgraphs=True
    ):
        if mode == "messages":
            message(*chunk)
        else:
            custom(chunk, cast(tuple[str, ...], namespace))
        if publisher.congested or publisher.should_yield() or sink.lost or sink.errors:
            await _pause(publisher, emitter)


async def _pause(publisher: Publisher, emitter: JobEmitter) -> None:
    """Between two chunks: wait while the publisher is congested, else let its writer send what is
    queued (see :meth:`Publisher.should_yield`); stop if the job's entries cannot be delivered."""
    if publisher.congested:
        await publisher.wait_writable()
    else:
        await asyncio.sleep(0)
    emitter.sink.check()


class _TokenHandler(StreamMessagesHandler):
    """LangGraph's ``messages``-mode handler, emitting to the job instead of ``astream``'s queue,
    and pausing the model between tokens as :func:`_pause` says.

    Sync nodes run in threads, where their models call back through LangChain's sync callback
    manager: there a token is handed to the event loop's thread, as LangGraph's own handler does,
    and a failure to emit it is raised from the job when the graph returns.
    """

    raise_error = True  # an emitter or publisher error ends the model call, and with it the job

    def __init__(self, emitter: JobEmitter, publisher: Publisher) -> None:
        super().__init__(self._put, subgraphs=True)
        self._emitter = emitter
        self._publisher = publisher
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._failure: Exception | None = None

    @property
    def on_llm_new_token(self) -> Callable[..., Awaitable[None] | None]:
        """LangChain looks the callback up for every event and awaits it if it is a coroutine
        function. On the event loop's thread that is :meth:`_token_on_loop`, which may pause; in a
        sync node's thread it is LangGraph's own (a coroutine there would be run in a new event
        loop per token)."""
        if threading.get_ident() == self._thread:
            return self._token_on_loop
        return super().on_llm_new_token

    async def _token_on_loop(self, token: str, *, chunk: Any = None, run_id: UUID, **kwargs: Any) -> None:
        if not isinstance(chunk, ChatGenerationChunk) or (meta := self.metadata.get(run_id)) is None:
            return
        self._emit(meta, chunk.message)
        publisher, sink = self._publisher, self._emitter.sink
        if publisher.congested or publisher.should_yield() or sink.lost or sink.errors:
            self.check()
            await _pause(publisher, self._emitter)

    def _put(self, chunk: Any) -> None:
        """Where LangGraph's handler puts ``(namespace, "messages", (message, metadata))``."""
        if threading.get_ident() == self._thread:
            self._emitter.message(*chunk[2])
        else:
            self._loop.call_soon_threadsafe(self._emit_from_thread, *chunk[2])

    def _emit_from_thread(self, message: BaseMessageChunk, metadata: dict[str, Any]) -> None:
        if self._failure is None:
            try:
                self._emitter.message(message, metadata)
            except Exception as e:  # raised from the job by check(): a loop callback cannot fail it
                self._failure = e

    def check(self) -> None:
        """Raise what went wrong emitting a chunk made in a sync node's thread."""
        if self._failure is not None:
            raise self._failure
