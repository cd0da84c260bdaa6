"""Which graphs a worker serves: built-ins plus user graphs named by ``module:attribute``."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from langgraph.graph import StateGraph
from langgraph.pregel import Pregel

from tokenbus.schemas.errors import GraphLoadError, UnknownGraph

Graph = Pregel[Any, Any, Any, Any]


class GraphRegistry:
    def __init__(self, graphs: Mapping[str, Graph]) -> None:
        self._graphs = dict(graphs)

    def get(self, name: str) -> Graph:
        try:
            return self._graphs[name]
        except KeyError:
            raise UnknownGraph(name, sorted(self._graphs)) from None

    @property
    def names(self) -> list[str]:
        return sorted(self._graphs)


def load_graph(path: str) -> Graph:
    """Load a graph from ``package.module:attribute`` (like ``langgraph.json``'s ``graphs``).

    The attribute may be a compiled graph, an uncompiled ``StateGraph`` (compiled here) or a
    function of no arguments returning either.
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise GraphLoadError(f"graph path {path!r} must look like 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise GraphLoadError(
            f"cannot import {module_name!r} for graph {path!r}: {e} "
            "(run the worker from the directory that holds it, or give --app-dir)"
        ) from e
    try:
        obj: Any = getattr(module, attribute)
    except AttributeError:
        raise GraphLoadError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if callable(obj) and not isinstance(obj, Pregel | StateGraph):
        obj = obj()
    if isinstance(obj, StateGraph):
        obj = obj.compile()
    if not isinstance(obj, Pregel):
        raise GraphLoadError(f"{path!r} is a {type(obj).__name__}, not a LangGraph graph")
    return obj
