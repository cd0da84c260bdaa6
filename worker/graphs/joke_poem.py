"""The LangGraph how-to's example: one node asks two chat models for a joke and a poem.

Two forms of the same node, picked by the job's stream modes:
- ``messages`` (default): LangChain ``ChatOpenAI`` models tagged ``joke`` and ``poem``; LangGraph
  streams their tokens with the call's metadata.
- ``custom`` only: the raw ``openai.AsyncOpenAI`` client, each token sent with
  ``writer((chunk, {**config["metadata"], "tags": [...]}))`` as in the how-to.
``config`` is passed explicitly to every model call, which Python < 3.11 needs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypedDict

import httpx2
from langchain_core.runnables import RunnableConfig
from langchain_openai import ChatOpenAI
from langgraph.graph import START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import StreamWriter
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionUserMessageParam

NAME = "joke_poem"


class State(TypedDict, total=False):
    topic: str
    joke: str
    poem: str


@dataclass(frozen=True)
class ModelEndpoint:
    """Where the chat models live; one HTTP connection pool shared by every client."""

    model: str
    base_url: str | None
    api_key: str
    http_client: httpx2.AsyncClient


def build(endpoint: ModelEndpoint) -> CompiledStateGraph[Any, Any, Any, Any]:
    def chat_model(tag: str) -> ChatOpenAI:
        return ChatOpenAI(
            model=endpoint.model,
            base_url=endpoint.base_url,
            api_key=endpoint.api_key,  # type: ignore[arg-type]
            http_async_client=endpoint.http_client,
            streaming=True,
            stream_usage=True,
            max_retries=0,
            tags=[tag],
        )

    joke_model, poem_model = chat_model("joke"), chat_model("poem")
    client = AsyncOpenAI(
        base_url=endpoint.base_url, api_key=endpoint.api_key, http_client=endpoint.http_client, max_retries=0
    )

    async def stream_tokens(prompt: str) -> AsyncIterator[dict[str, Any]]:
        messages: list[ChatCompletionUserMessageParam] = [{"role": "user", "content": prompt}]
        response = await client.chat.completions.create(
            messages=messages,
            model=endpoint.model,
            stream=True,
            stream_options={"include_usage": True},
        )
        role = None
        async with response:  # closes the HTTP stream on cancellation too
            async for chunk in response:
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                if delta.role is not None:
                    role = delta.role
                if delta.content:
                    yield {"role": role, "content": delta.content}

    async def call_model(state: State, config: RunnableConfig, writer: StreamWriter) -> State:
        topic = state.get("topic", "cats")
        joke_prompt, poem_prompt = f"Write a joke about {topic}", f"Write a short poem about {topic}"
        modes = (config.get("configurable") or {}).get("tokenbus_modes", ("messages",))
        if "messages" in modes:
            joke = await joke_model.ainvoke([{"role": "user", "content": joke_prompt}], config)
            poem = await poem_model.ainvoke([{"role": "user", "content": poem_prompt}], config)
            return {"joke": joke.text, "poem": poem.text}
        texts = {}
        for tag, prompt in (("joke", joke_prompt), ("poem", poem_prompt)):
            text = ""
            async for msg_chunk in stream_tokens(prompt):
                text += msg_chunk["content"]
                writer((msg_chunk, {**config.get("metadata", {}), "tags": [tag]}))
            texts[tag] = text
        return {"joke": texts["joke"], "poem": texts["poem"]}

    return StateGraph(State).add_node("call_model", call_model).add_edge(START, "call_model").compile(name=NAME)
