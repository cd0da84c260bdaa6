"""The job request: what a producer enqueues and a worker runs (arq argument, JSON)."""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tokenbus.schemas.errors import ContractError, InvalidJobRequest
from tokenbus.schemas.keys import validate_job_id, validate_tag

_GRAPH_NAME = r"^[A-Za-z0-9._:-]+$"
RESERVED_CONFIG_PREFIXES = ("__pregel_", "tokenbus_")
"""``config`` keys a request may not set: LangGraph's internals, and what the worker sets itself."""

JOB_FUNCTION = "run_graph"
"""The arq function name of a tokenbus job (the envelope's ``f``)."""

StreamMode = Literal["messages", "custom", "updates", "values"]
"""The LangGraph stream modes a job may publish: chunks (``messages``, ``custom``) and state
(``updates``, ``values``)."""
STREAM_MODES: tuple[StreamMode, ...] = get_args(StreamMode)
ALL_MODES: tuple[StreamMode, ...] = ("messages", "custom")
"""The modes of a request that names none: every mode that streams chunks (tokens and payloads).
``updates`` and ``values`` are published only when a request asks for them."""
DEFAULT_MAX_REQUEST_BYTES = 1 << 20


class JobRequest(BaseModel):
    """A request to run one graph once and stream what it produces."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    graph: str = Field(min_length=1, max_length=128, pattern=_GRAPH_NAME)
    """Name of a graph registered with the worker."""
    input: dict[str, Any] = Field(default_factory=dict)
    """The graph input. A JSON object, or a string holding one."""
    modes: tuple[StreamMode, ...] = ALL_MODES
    """LangGraph stream modes to publish."""
    tags: tuple[str, ...] | None = None
    """Publish tag-stream copies only for these tags (the job stream always gets every chunk)."""
    job_id: str | None = None
    """Idempotent enqueue: a second request with the same id is not run again."""
    timeout_s: float | None = Field(default=None, gt=0)
    """Per-job timeout; the worker's default when unset, capped by its maximum."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Passed to the graph as ``config["configurable"]``."""

    @field_validator("input", mode="before")
    @classmethod
    def _parse_json_input(cls, value: Any) -> Any:
        if isinstance(value, str | bytes):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError as e:
                raise ValueError(f"input is not valid JSON ({e}); pass a JSON object such as {{}}") from e
            if not isinstance(value, dict):
                raise ValueError(f"input must be a JSON object, got {type(value).__name__}")
        return value

    @field_validator("modes")
    @classmethod
    def _modes_not_empty(cls, value: tuple[StreamMode, ...]) -> tuple[StreamMode, ...]:
        if not value:
            raise ValueError(f"at least one stream mode is needed: {', '.join(STREAM_MODES)}")
        return tuple(dict.fromkeys(value))

    @field_validator("tags")
    @classmethod
    def _valid_tags(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else tuple(_contract(validate_tag, tag) for tag in value)

    @field_validator("config")
    @classmethod
    def _no_reserved_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(k for k in value if k.startswith(RESERVED_CONFIG_PREFIXES))
        if reserved:
            shown = ", ".join(repr(k[:60]) for k in reserved[:5])
            raise ValueError(f"keys starting with __pregel_ or tokenbus_ are LangGraph's or the worker's: {shown}")
        return value

    @field_validator("job_id")
    @classmethod
    def _valid_job_id(cls, value: str | None) -> str | None:
        return None if value is None else _contract(validate_job_id, value)

    @classmethod
    def parse(cls, raw: object, *, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> JobRequest:
        """Validate a request from the queue; raise :class:`InvalidJobRequest` naming every problem."""
        if isinstance(raw, JobRequest):
            return raw
        if not isinstance(raw, dict):
            raise InvalidJobRequest(
                "invalid job request: expected a JSON object such as "
                '{"graph": "joke_poem", "input": {"topic": "cats"}}, '
                f"got {type(raw).__name__} {raw!r:.80}"
            )
        size = len(orjson.dumps(raw, default=repr))
        if size > max_bytes:
            raise InvalidJobRequest(f"job request is {size} bytes; this worker accepts at most {max_bytes}")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise InvalidJobRequest(describe_validation_error("invalid job request", e)) from e

    def to_arg(self) -> dict[str, Any]:
        """The JSON-ready job argument."""
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=True) | {"graph": self.graph}


def is_valid_graph_name(name: str) -> bool:
    return 0 < len(name) <= 128 and re.fullmatch(_GRAPH_NAME, name) is not None


def describe_validation_error(what: str, error: ValidationError) -> str:
    """One readable line per problem: ``what: field.path: message``."""
    problems = []
    for item in error.errors(include_url=False):
        where = ".".join(str(p) for p in item["loc"]) or "request"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return f"{what}: " + "; ".join(problems)


def _contract(check: Any, value: str) -> str:
    try:
        result: str = check(value)
    except ContractError as e:
        raise ValueError(str(e)) from None
    return result
