"""arq job and result serialization: JSON, never pickle (other languages can enqueue).

A job envelope (``arq:job:<id>``) is ``{"t": try, "f": function, "a": [args], "k": {kwargs},
"et": enqueue time ms}``. One written by another language may be wrong in any of its parts; arq
would fail on it somewhere deep in its worker, so the envelope is checked here, as it is read,
and a broken one fails its job with a message naming the part that is wrong.
"""

from __future__ import annotations

from typing import Any

import orjson

_ENVELOPE_TYPES: dict[str, tuple[type, ...]] = {
    "t": (int, type(None)),
    "f": (str,),
    "a": (list,),
    "k": (dict,),
    "et": (int, float),
}
ENVELOPE_FIELDS = tuple(_ENVELOPE_TYPES)
"""The fields of a job envelope, in the order arq writes them (schemas/CONTRACT.md)."""
_ENVELOPE_HINT = '{"t": 1, "f": "run_graph", "a": [request], "k": {}, "et": enqueue ms}'


class InvalidEnvelope(ValueError):
    """A job envelope that arq could not run."""


def _fallback(value: Any) -> Any:
    if isinstance(value, BaseException):
        cause = value.__cause__
        detail = f" ({cause})" if cause is not None and str(cause) not in str(value) else ""
        return f"{type(value).__name__}: {value}{detail}"
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def job_serializer(value: Any) -> bytes:
    return orjson.dumps(value, default=_fallback)


def job_deserializer(data: bytes) -> Any:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise InvalidEnvelope(f"the job is not JSON ({e}); tokenbus jobs are JSON, never pickle") from None
    if isinstance(value, dict) and "s" not in value:  # a job envelope ("s" marks a job's result)
        check_envelope(value)
    return value


def check_envelope(envelope: dict[str, Any]) -> None:
    """Raise :class:`InvalidEnvelope` naming the first part of ``envelope`` arq cannot use."""
    for name, types in _ENVELOPE_TYPES.items():
        if name not in envelope:
            raise InvalidEnvelope(f"the job envelope has no {name!r}; expected {_ENVELOPE_HINT}")
        value = envelope.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise InvalidEnvelope(
                f"the job envelope's {name!r} is {type(value).__name__}, not {allowed}; expected {_ENVELOPE_HINT}"
            )
