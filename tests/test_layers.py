"""The architecture, kept: one namespace, dependencies that point one way, light clients.

tokenbus.schemas   the wire contract          imports nothing of ours
tokenbus.consumer  the reading side           imports schemas
tokenbus.worker    the producing side         imports schemas, consumer
tokenbus.*         the application shell      imports any of them (and nothing imports it)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"schemas": {"schemas"}, "consumer": {"schemas", "consumer"}, "worker": {"schemas", "consumer", "worker"}}
"""Each layer (a top-level directory, imported as ``tokenbus.<layer>``) and what it may import."""
HEAVY = ("langgraph", "langchain_core", "langchain_openai", "openai", "fakeredis")


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
    return modules


def ours(module: str) -> str | None:
    """The part of tokenbus a module name belongs to: a layer, or ``shell``; None if not ours."""
    parts = module.split(".")
    if parts[0] in LAYERS:
        return f"top-level {parts[0]}"  # not under the namespace: shadowed by a user's own module
    if parts[0] != "tokenbus":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "shell"


def python_files(directory: str) -> list[Path]:
    return sorted((ROOT / directory).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    allowed = LAYERS[layer]
    wrong = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in python_files(layer)
        for module in sorted(imported_modules(path))
        if (part := ours(module)) is not None and part not in allowed
    ]
    assert wrong == []


def test_everything_imports_tokenbus_through_its_namespace() -> None:
    files = [p for d in ("tokenbus", "tests", "bench") for p in python_files(d) if p.parent.name not in LAYERS]
    wrong = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in files
        for module in sorted(imported_modules(path))
        if (part := ours(module)) is not None and part.startswith("top-level")
    ]
    assert files and wrong == []


def test_clients_and_readers_load_no_graph_library() -> None:
    """A service that enqueues or reads tokens does not pay for LangGraph, LangChain or openai."""
    light = [
        "tokenbus.worker.client",
        "tokenbus.consumer.subscribe",
        "tokenbus.consumer.groups",
        "tokenbus.consumer.jobs",
        "tokenbus.cli",
        "tokenbus.commands",
    ]
    code = (
        f"import importlib, sys\nfor m in {light!r}: importlib.import_module(m)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert loaded.stdout.strip() == "[]", loaded.stdout


ADAPTERS = ("_langgraph.py", "_redis.py", "_arq.py")
"""One module of ``worker/`` per library whose private parts tokenbus uses; each lists them in
``PRIVATE_NAMES`` and checks the library's version at import (``WRITTEN_FOR``)."""


def private_names(adapter: str) -> tuple[str, ...]:
    """The adapter's ``PRIVATE_NAMES``, read from its source (importing it would need its library)."""
    tree = ast.parse((ROOT / "worker" / adapter).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PRIVATE_NAMES" for t in node.targets):
            names: tuple[str, ...] = ast.literal_eval(node.value)
            return names
    raise AssertionError(f"worker/{adapter} lists no PRIVATE_NAMES")


def test_private_parts_of_a_library_are_used_in_its_adapter_only() -> None:
    sources = [p for d in ("schemas", "consumer", "worker", "tokenbus") for p in python_files(d)]
    stray = [
        f"{path.relative_to(ROOT)} uses {name} (only worker/{adapter} may)"
        for path in sources
        if path.parent.name not in LAYERS or path.parent.parent == ROOT
        for adapter in ADAPTERS
        for name in private_names(adapter)
        if name in path.read_text() and path.name != adapter
    ]
    assert stray == []
    for adapter in ADAPTERS:
        assert private_names(adapter) and "WRITTEN_FOR" in (ROOT / "worker" / adapter).read_text(), adapter
