"""arq job and result serialization: JSON, never pickle (other languages can enqueue)."""

from __future__ import annotations

from typing import Any

import orjson


def _fallback(value: Any) -> Any:
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def job_serializer(value: Any) -> bytes:
    return orjson.dumps(value, default=_fallback)


def job_deserializer(data: bytes) -> Any:
    return orjson.loads(data)
