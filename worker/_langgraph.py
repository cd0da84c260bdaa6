"""Everything tokenbus takes from LangGraph's private parts, in one place.

Written for LangGraph 1.2 (checked at import). What it uses and why:

- ``langgraph._internal._constants``: the configurable keys under which a graph finds its parent's
  stream and runtime, and the checkpoint namespace of the running node. A job installs its own
  stream writer there, as a parent graph that streams ``custom`` payloads would.
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
from collections.abc import Callable
from typing import Any

from langgraph._internal._constants import CONFIG_KEY_CHECKPOINT_NS, CONFIG_KEY_RUNTIME, CONFIG_KEY_STREAM, NS_SEP
from langgraph.config import get_config
from langgraph.pregel._messages import StreamMessagesHandler
from langgraph.pregel.protocol import StreamProtocol
from langgraph.runtime import Runtime

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

_NO_STREAM = StreamProtocol(lambda chunk: None, set())
"""The "parent stream" that makes LangGraph use the runtime's writer: it takes no mode itself."""


def install_writer(configurable: dict[str, Any], writer: Callable[[Any], None]) -> None:
    """Make ``writer`` the stream writer of a graph run with this ``configurable`` (and of its
    subgraphs), as if it ran inside a parent graph that streams ``custom`` payloads to it."""
    configurable[CONFIG_KEY_STREAM] = _NO_STREAM
    configurable[CONFIG_KEY_RUNTIME] = Runtime(stream_writer=writer)


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
