"""Everything tokenbus takes from LangGraph's private parts, in one place.

Written for LangGraph 1.2 (checked at import). What it uses and why:

- ``langgraph._internal._constants``: the configurable keys under which a graph finds its parent's
  stream and runtime, and the checkpoint namespace of the running node. A job installs its own
  stream writer there, as a parent graph that streams ``custom`` payloads would, and its own
  receiver of ``updates`` and ``values`` chunks, as a parent graph streaming those modes with
  ``subgraphs=True`` would (LangGraph hands a graph's and its subgraphs' chunks to their parent's
  stream as they are made).
- ``langgraph.pregel._messages.StreamMessagesHandler`` and its ``_emit``: the callback handler
  behind ``astream(stream_mode="messages")`` (the same chunks, metadata, ``nostream`` and subgraph
  rules), subclassed so that tokens leave in the model's callback instead of through
  ``astream``'s queue.

The public API that would replace all of it: ``graph.astream(input, config,
stream_mode=[...], subgraphs=True)``, which costs a queue and a task wake-up per chunk
(BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Collection
from typing import Any, cast

from langgraph._internal._constants import CONFIG_KEY_CHECKPOINT_NS, CONFIG_KEY_RUNTIME, CONFIG_KEY_STREAM, NS_SEP
from langgraph.config import get_config
from langgraph.pregel._messages import StreamMessagesHandler
from langgraph.pregel.protocol import StreamProtocol
from langgraph.runtime import Runtime
from langgraph.types import StreamMode

PRIVATE_NAMES = ("langgraph._internal", "langgraph.pregel._messages", "._emit(")
"""What this module uses of the library's private parts: no other module of tokenbus may (tests/test_layers.py)."""
WRITTEN_FOR = ("1.2",)
"""The LangGraph minor versions this module was written and tested against."""

_version = importlib.metadata.version("langgraph")
if ".".join(_version.split(".")[:2]) not in WRITTEN_FOR:
    raise ImportError(
        f"tokenbus's worker uses private parts of LangGraph {' or '.join(WRITTEN_FOR)}, "
        f"and LangGraph {_version} is installed: install a version tokenbus supports"
    )

Chunk = tuple[tuple[str, ...], str, Any]
"""``(namespace, mode, chunk)``, as ``astream(stream_mode=[...], subgraphs=True)`` yields it."""


def install_stream(
    configurable: dict[str, Any],
    writer: Callable[[Any], None] | None = None,
    put: Callable[[Chunk], None] | None = None,
    modes: Collection[str] = (),
) -> None:
    """Run a graph with this ``configurable`` as if inside a parent graph that streams to the job:
    ``writer`` (if given) is the stream writer of the graph and its subgraphs (``custom``), and
    ``put`` (if given) takes their chunks of ``modes`` (``updates``, ``values``) as they are made."""
    stream_modes = cast(set[StreamMode], set(modes) if put else set())
    configurable[CONFIG_KEY_STREAM] = StreamProtocol(put or _ignore, stream_modes)
    configurable[CONFIG_KEY_RUNTIME] = Runtime(stream_writer=writer or _ignore)


def install_writer(configurable: dict[str, Any], writer: Callable[[Any], None]) -> None:
    """Make ``writer`` the stream writer of a graph run with this ``configurable`` (and of its
    subgraphs), as if it ran inside a parent graph that streams ``custom`` payloads to it (bench/
    measures LangGraph with it)."""
    install_stream(configurable, writer)


def _ignore(chunk: Any) -> None:
    """What a mode the job did not ask for is written to."""


def writer_namespace() -> tuple[str, ...]:
    """The namespace of the graph whose node is writing (as ``astream(..., subgraphs=True)`` gives it)."""
    return tuple(get_config()["configurable"][CONFIG_KEY_CHECKPOINT_NS].split(NS_SEP)[:-1])


class MessagesHandler(StreamMessagesHandler):
    """LangGraph's ``messages``-mode callback handler, whose chunks go to ``put``."""

    def __init__(self, put: Callable[[Any], None]) -> None:
        super().__init__(put, subgraphs=True)

    def emit(self, metadata: Any, message: Any) -> None:
        """What the handler does with a model's token: hand ``(namespace, "messages", (message,
        metadata))`` to ``put``, by LangGraph's rules (deduplication, ``nostream``)."""
        self._emit(metadata, message)
