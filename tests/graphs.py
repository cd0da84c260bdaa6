"""User graphs for the tests, registered by import path like any user's graph."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, TypedDict

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, AnyMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import StreamWriter


class State(TypedDict, total=False):
    n: int
    done: bool


def _graph(node: Any) -> Any:
    return StateGraph(State).add_node("node", node).add_edge(START, "node").compile()


async def _burst(state: State, writer: StreamWriter) -> State:
    for i in range(state.get("n", 1000)):
        writer({"content": f"{i} ", "tags": ["burst"]})
    return {"done": True}


async def _burst_tokens(state: State, config: RunnableConfig) -> State:
    await WordsModel(text=" ".join(str(i) for i in range(state.get("n", 1000))), tags=["burst"]).ainvoke("go", config)
    return {"done": True}


GATE: dict[str, asyncio.Event] = {}
"""``GATE["open"]``: what ``gated`` jobs wait for (in-process workers only: the test's event loop)."""


async def _gated(state: State, writer: StreamWriter) -> State:
    writer({"content": "waiting at the gate"})
    await GATE.setdefault("open", asyncio.Event()).wait()
    return {"done": True}


async def _bad_payload(state: State, writer: StreamWriter) -> State:
    writer({"content": "fine", "tags": ["x"]})
    writer({"content": "not fine", "when": object()})
    return {"done": True}


async def _swallowed_bad_payload(state: State, writer: StreamWriter) -> State:
    writer({"content": "fine"})
    with contextlib.suppress(TypeError):  # a node that carries on: its job fails anyway, once the graph returns
        writer({"content": "not fine", "when": object()})
    return {"done": True}


async def _bad_tags(state: State, writer: StreamWriter) -> State:
    writer({"content": "x", "tags": ["has space"]})
    return {"done": True}


async def _changing_tags(state: State, writer: StreamWriter) -> State:
    writer({"content": "1", "tags": ["a"]})
    writer({"content": "2", "tags": ["a", "b"]})
    writer({"content": "3", "tags": ["b"]})
    writer({"content": "4"})
    writer(({"content": "5"}, {"langgraph_node": "node", "tags": ["a"]}))  # the how-to's (payload, metadata)
    return {"done": True}


async def _child(state: State, writer: StreamWriter) -> State:
    writer({"content": "from the subgraph", "tags": ["sub"]})
    return {"done": True}


child = _graph(_child)


def nested() -> Any:
    """A factory: the registry calls functions of no arguments."""
    return StateGraph(State).add_node("parent", child).add_edge(START, "parent").compile()


async def _blocks_the_loop(state: State, writer: StreamWriter) -> State:
    """A user graph on a bad day: an async node that calls something blocking (``n`` tenths of a second)."""
    writer({"content": "blocking"})
    time.sleep(state.get("n", 30) / 10)  # noqa: ASYNC251  # the point of this graph
    return {"done": True}


burst = _graph(_burst)
blocks_the_loop = _graph(_blocks_the_loop)
burst_tokens = _graph(_burst_tokens)
gated = _graph(_gated)
changing_tags = _graph(_changing_tags)
bad_payload = _graph(_bad_payload)
swallowed_bad_payload = _graph(_swallowed_bad_payload)
bad_tags = StateGraph(State).add_node("node", _bad_tags).add_edge(START, "node")  # uncompiled: compiled on load


# -- every way LangGraph makes a `messages` chunk, and `custom` payloads between them -----------------


class WordsModel(BaseChatModel):
    """Streams the words of ``text``, from ``_stream`` (sync nodes) and ``_astream`` (async ones)."""

    text: str = "one two three"

    @property
    def _llm_type(self) -> str:
        return "words"

    def _generate(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> ChatResult:  # fmt: skip
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=self.text))])

    def _chunks(self) -> list[ChatGenerationChunk]:
        return [ChatGenerationChunk(message=AIMessageChunk(content=f"{w} ")) for w in self.text.split()]

    def _stream(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:  # fmt: skip
        for chunk in self._chunks():
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:  # fmt: skip
        for chunk in self._chunks():
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


class Chat(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]


async def _async_models(state: Chat, config: RunnableConfig, writer: StreamWriter) -> Chat:
    writer({"content": "before ", "tags": ["w"]})
    await WordsModel(text="async one", tags=["a"]).ainvoke("go", config)
    writer({"content": "between "})
    await WordsModel(text="never streamed", tags=["nostream"]).ainvoke("go", config)
    return {}


def _sync_model(state: Chat, config: RunnableConfig, writer: StreamWriter) -> Chat:  # LangGraph runs it in a thread
    writer({"content": "threaded ", "tags": ["w"]})
    WordsModel(text="sync two", tags=["b"]).invoke("go", config)
    writer({"content": "threaded again "})
    return {}


async def _inner_model(state: Chat, config: RunnableConfig, writer: StreamWriter) -> Chat:
    await WordsModel(text="nested three", tags=["c"]).ainvoke("go", config)
    writer({"content": "nested payload ", "tags": ["w"]})
    return {}


def _answer(state: Chat) -> Chat:  # a message in the node's output, streamed by no model
    return {"messages": [AIMessage(content="a whole answer", id="answer-1")]}


inner = StateGraph(Chat).add_node("inner_model", _inner_model).add_edge(START, "inner_model").compile()
every_chunk = (
    StateGraph(Chat)
    .add_sequence([("async_models", _async_models), ("sync_model", _sync_model), ("sub", inner), ("answer", _answer)])
    .add_edge(START, "async_models")
    .compile()
)


async def _bad_model_tags(state: Chat, config: RunnableConfig) -> Chat:
    await WordsModel(tags=["has space"]).ainvoke("go", config)
    return {}


def _bad_model_tags_sync(state: Chat, config: RunnableConfig) -> Chat:
    WordsModel(tags=["has space"]).invoke("go", config)
    return {}


async def _swallowed_bad_model_tags(state: Chat, config: RunnableConfig) -> Chat:
    with contextlib.suppress(ValueError):  # a node that carries on: its job fails anyway, once the graph returns
        await WordsModel(tags=["has space"]).ainvoke("go", config)
    return {}


bad_model_tags = StateGraph(Chat).add_node("node", _bad_model_tags).add_edge(START, "node").compile()
bad_model_tags_sync = StateGraph(Chat).add_node("node", _bad_model_tags_sync).add_edge(START, "node").compile()
swallowed_bad_model_tags = (
    StateGraph(Chat).add_node("node", _swallowed_bad_model_tags).add_edge(START, "node").compile()
)


# -- state that is not all JSON, and state chunks made in a sync node's thread --------------------


class Odd(TypedDict, total=False):
    topic: str
    size: int
    opaque: Any
    big: str


def _odd(state: Odd) -> Odd:
    return {"opaque": object(), "big": "x" * state.get("size", 100_000)}


odd_state = StateGraph(Odd).add_node("odd", _odd).add_edge(START, "odd").compile()


def _leaf(state: State) -> State:
    return {"done": True}


sync_child = StateGraph(State).add_node("leaf", _leaf).add_edge(START, "leaf").compile()


def _calls_child(state: State, config: RunnableConfig) -> State:  # in a thread, where the subgraph's loop runs too
    return sync_child.invoke(state, config)  # type: ignore[return-value]


sync_subgraph = StateGraph(State).add_node("calls", _calls_child).add_edge(START, "calls").compile()
