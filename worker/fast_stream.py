"""The fast path of :mod:`tokenbus.worker.streaming`: chunks leave the graph where LangGraph makes
them (through LangGraph's private parts, :mod:`tokenbus.worker._langgraph`; importing this module
fails where those are not what they were written for, and the worker takes the public path).

``updates`` and ``values`` chunks leave the same way: LangGraph hands them to the stream of the
graph's parent as it makes them, and the job's stream is that parent's (with ``subgraphs``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from uuid import UUID

from langchain_core.messages import BaseMessageChunk
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.runnables import RunnableConfig

from tokenbus.worker._langgraph import Chunk, MessagesHandler, install_stream, writer_namespace
from tokenbus.worker.emitter import JobEmitter
from tokenbus.worker.publisher import Publisher
from tokenbus.worker.registry import Graph


async def stream(
    graph: Graph,
    graph_input: Any,
    config: RunnableConfig,
    modes: Sequence[str],
    emitter: JobEmitter,
    publisher: Publisher,
) -> Any:
    """``graph.ainvoke`` with the job's messages handler, stream writer and state receiver
    installed; returns the graph's final state (what ``ainvoke`` returns)."""
    tap = _Tap(emitter, publisher)
    configurable = config["configurable"]
    if "messages" in modes:
        config["callbacks"] = [_TokenHandler(tap)]
    state_modes = [mode for mode in modes if mode in ("updates", "values")]
    if "custom" in modes or state_modes:
        install_stream(
            configurable, tap.write if "custom" in modes else None, tap.state if state_modes else None, state_modes
        )
    final = await graph.ainvoke(graph_input, config)
    tap.check()
    return final


class _Tap:
    """Where one job's chunks leave the graph: straight to the emitter on the event loop's thread,
    handed over to it from a sync node's thread. Remembers the first failure to emit, which
    :meth:`check` raises: a node may catch what a writer call or a model raised, and the job fails
    anyway (its chunks would otherwise be missing without a word)."""

    def __init__(self, emitter: JobEmitter, publisher: Publisher) -> None:
        self.emitter = emitter
        self.publisher = publisher
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        self.failure: Exception | None = None

    def write(self, chunk: Any) -> None:
        """The graph's stream writer: one ``custom`` payload, with the namespace of the graph
        that wrote it (as ``astream(..., subgraphs=True)`` gives it)."""
        self.emit(self.emitter.custom, chunk, writer_namespace())

    def state(self, chunk: Chunk) -> None:
        """Where LangGraph puts an ``updates`` or ``values`` chunk of the graph or a subgraph."""
        namespace, mode, payload = chunk
        self.emit(self.emitter.update if mode == "updates" else self.emitter.values, payload, tuple(namespace))

    def emit(self, method: Callable[..., None], *args: Any) -> None:
        """``method(*args)`` (an emitter's) on the event loop's thread; from another thread, handed
        over to it."""
        if threading.get_ident() != self.thread:
            self.loop.call_soon_threadsafe(self.from_thread, method, *args)
            return
        if self.failure is not None:
            raise self.failure
        try:
            method(*args)
            self.emitter.sink.check()
        except Exception as e:
            self.failure = e
            raise

    def from_thread(self, method: Callable[..., None], *args: Any) -> None:
        """Emit a chunk made in a sync node's thread (a loop callback: it cannot fail the job)."""
        if self.failure is None:
            try:
                method(*args)
            except Exception as e:
                self.failure = e

    def check(self) -> None:
        """Raise what went wrong emitting a chunk, if anything did."""
        if self.failure is not None:
            raise self.failure


class _TokenHandler(MessagesHandler):
    """LangGraph's ``messages``-mode handler, emitting to the job instead of ``astream``'s queue
    and pausing the model between tokens: while the publisher is congested, and once in a while to
    let its writer send what is queued (see :meth:`Publisher.should_yield`). Stops the model if the
    job's entries cannot be delivered."""

    raise_error = True  # an emitter or publisher error ends the model call, and with it the job

    def __init__(self, tap: _Tap) -> None:
        super().__init__(self._put)
        self._tap = tap

    @property
    def on_llm_new_token(self) -> Callable[..., Awaitable[None] | None]:
        """LangChain looks the callback up for every event and awaits it if it is a coroutine
        function. On the event loop's thread that is :meth:`_token_on_loop`, which may pause; in a
        sync node's thread it is LangGraph's own (a coroutine there would be run in a new event
        loop per token)."""
        if threading.get_ident() == self._tap.thread:
            return self._token_on_loop
        return super().on_llm_new_token

    async def _token_on_loop(self, token: str, *, chunk: Any = None, run_id: UUID, **kwargs: Any) -> None:
        if not isinstance(chunk, ChatGenerationChunk) or (meta := self.metadata.get(run_id)) is None:
            return
        self.emit(meta, chunk.message)  # through the tap, which raises what went wrong so far
        publisher = self._tap.publisher
        if publisher.congested:
            await publisher.wait_writable()
        elif publisher.should_yield():
            await asyncio.sleep(0)
        else:
            return
        self._tap.emitter.sink.check()  # entries lost while the model waited

    def _put(self, chunk: Any) -> None:
        """Where LangGraph's handler puts ``(namespace, "messages", (message, metadata))``."""
        message: BaseMessageChunk
        message, metadata = chunk[2]
        self._tap.emit(self._tap.emitter.message, message, metadata)
