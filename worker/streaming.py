"""How a job's chunks are taken from LangGraph and handed to its emitter.

A job runs its graph with ``ainvoke``, not ``astream``: each chunk is emitted where LangGraph makes
it instead of going through ``astream``'s queue, which costs a loop callback, a queue and a wake-up
of the consuming task per chunk (several times what a ``custom`` payload costs LangGraph to make).

- ``messages``: LangGraph's own ``messages``-mode callback handler (the one behind
  ``astream(stream_mode="messages")``: the same chunks and metadata, the same ``nostream``,
  node-output and subgraph rules) emits each token in the model's callback, and pauses the model
  for the publisher there: a model that never suspends (one that answers from memory) is published
  while it runs rather than after, and a congested publisher holds the model back (BENCHMARKS.md).
- ``custom``: the graph's stream writer is the job's own, installed where LangGraph looks for the
  writer of a parent graph (a subgraph's writer is its parent's), so ``writer(...)`` emits the
  payload with the namespace ``astream`` would give it. A writer call cannot wait: a node that
  never suspends holds the event loop, the publisher's writer included, until it does, as it holds
  ``astream``'s consumer.

- ``updates`` and ``values``: the graph's own parent stream is the job's, which LangGraph hands
  the chunks of those modes (the graph's and its subgraphs') as it makes them.

All emit in the order the graph made the chunks; the graph's final state is what ``ainvoke``
returns. This path (:mod:`tokenbus.worker.fast_stream`)
uses LangGraph's private parts; with a LangGraph it was not written for, jobs take the **public
path** instead, ``astream(stream_mode=modes, subgraphs=True)`` (the same chunks, slower per chunk:
BENCHMARKS.md), and the worker logs so at start. ``test_user_graphs.py`` runs both. Chunks made
in a sync node's thread are handed to the event loop's thread, as LangGraph does; a failure to
emit one there is raised when the graph returns.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from types import ModuleType
from typing import Any

from langchain_core.runnables import RunnableConfig

from tokenbus.schemas.job import JobRequest, StreamMode
from tokenbus.worker.emitter import JobEmitter
from tokenbus.worker.publisher import Publisher
from tokenbus.worker.registry import Graph

logger = logging.getLogger(__name__)

fast_stream: ModuleType | None
try:
    from tokenbus.worker import fast_stream
except ImportError as e:  # a LangGraph whose private parts the fast path was not written for
    fast_stream = None
    logger.warning("%s; jobs stream through LangGraph's public astream instead (slower per chunk)", e)


async def stream_graph(graph: Graph, request: JobRequest, emitter: JobEmitter, publisher: Publisher) -> Any:
    """Run ``graph`` on the request's input, emit every chunk of the request's modes, and return
    the graph's final state."""
    configurable: dict[str, Any] = {
        **request.config,
        "tokenbus_job_id": emitter.job_id,
        "tokenbus_attempt": emitter.attempt,
        "tokenbus_modes": request.modes,
    }
    config: RunnableConfig = {"configurable": configurable}
    if fast_stream is not None:
        return await fast_stream.stream(graph, request.input, config, request.modes, emitter, publisher)
    return await stream_public(graph, request.input, config, request.modes, emitter, publisher)


async def stream_public(
    graph: Graph,
    graph_input: Any,
    config: RunnableConfig,
    modes: Sequence[StreamMode],
    emitter: JobEmitter,
    publisher: Publisher,
) -> Any:
    """The public path: ``astream(stream_mode=modes, subgraphs=True)``, each chunk emitted as it
    is yielded; the graph waits while the publisher is congested. ``values`` is streamed even when
    not published: the top graph's last one is the final state, returned."""
    publish_values = "values" in modes
    stream_modes: list[StreamMode] = list(modes) if publish_values else [*modes, "values"]
    final: Any = None
    chunks: AsyncIterator[tuple[tuple[str, ...], str, Any]]
    chunks = graph.astream(graph_input, config, stream_mode=stream_modes, subgraphs=True)  # type: ignore[assignment]
    async for namespace, mode, chunk in chunks:
        if mode == "messages":
            message, metadata = chunk
            emitter.message(message, metadata)
        elif mode == "custom":
            emitter.custom(chunk, tuple(namespace))
        elif mode == "updates":
            emitter.update(chunk, tuple(namespace))
        else:
            if not namespace:
                final = chunk
            if not publish_values:
                continue
            emitter.values(chunk, tuple(namespace))
        emitter.sink.check()
        if publisher.congested:
            await publisher.wait_writable()
    return final
