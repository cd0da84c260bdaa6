"""User graphs for the tests, registered by import path like any user's graph."""

from __future__ import annotations

from typing import Any, TypedDict

from langgraph.graph import START, StateGraph
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


async def _bad_payload(state: State, writer: StreamWriter) -> State:
    writer({"content": "fine", "tags": ["x"]})
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


burst = _graph(_burst)
changing_tags = _graph(_changing_tags)
bad_payload = _graph(_bad_payload)
bad_tags = StateGraph(State).add_node("node", _bad_tags).add_edge(START, "node")  # uncompiled: compiled on load
