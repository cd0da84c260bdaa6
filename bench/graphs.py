"""Graphs for the benchmarks: a lean fake chat model (no HTTP, no sleep) and paced custom writers.

Their chunks are tagged ``bench``, or the input's ``tag`` (to spread tag streams over a cluster's shards)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypedDict

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig
from langgraph.graph import START, StateGraph
from langgraph.types import StreamWriter

WORDS = [" lorem", " ipsum", " dolor", " sit", " amet", ",", " consectetur", " adipiscing", " elit", "."]


class LeanChatModel(BaseChatModel):
    """Streams ``n`` tokens from a native ``_astream``: the cheapest chat model LangGraph can stream."""

    n: int = 1000

    @property
    def _llm_type(self) -> str:
        return "lean-fake"

    def _generate(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> ChatResult:  # fmt: skip
        text = "".join(WORDS[i % len(WORDS)] for i in range(self.n))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])

    def _stream(self, *args: Any, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        raise NotImplementedError("async only")

    async def _astream(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:  # fmt: skip
        n = kwargs.get("n", self.n)
        for i in range(n):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=WORDS[i % len(WORDS)]))
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


class State(TypedDict, total=False):
    n: int
    rate: float
    tag: str
    done: bool


_model = LeanChatModel(tags=["bench"])


async def _messages(state: State, config: RunnableConfig) -> State:
    tag = state.get("tag", "bench")
    model = _model if tag == "bench" else LeanChatModel(tags=[tag])
    await model.ainvoke("go", config, n=state.get("n", 1000))
    return {"done": True}


async def _tokens(n: int) -> AsyncIterator[str]:
    for i in range(n):
        yield WORDS[i % len(WORDS)]


async def _custom(state: State, writer: StreamWriter) -> State:
    tag = state.get("tag", "bench")
    async for token in _tokens(state.get("n", 1000)):
        writer({"content": token, "tags": [tag]})
    return {"done": True}


async def _paced(state: State, writer: StreamWriter) -> State:
    """``n`` tokens at ``rate`` per second; each payload carries the wall times it was written at
    (``t``) and due at (``due``: an event loop that cannot keep up writes late)."""
    interval = 1.0 / state.get("rate", 100.0)
    start, wall, tag = time.monotonic(), time.time(), state.get("tag", "bench")
    for i in range(state.get("n", 100)):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        writer({"content": WORDS[i % len(WORDS)], "t": time.time(), "due": wall + i * interval, "tags": [tag]})
    return {"done": True}


def _graph(node: Any) -> Any:
    return StateGraph(State).add_node("node", node).add_edge(START, "node").compile()


messages = _graph(_messages)
custom = _graph(_custom)
paced = _graph(_paced)

GRAPHS = {
    "bench_messages": "bench.graphs:messages",
    "bench_custom": "bench.graphs:custom",
    "bench_paced": "bench.graphs:paced",
}
