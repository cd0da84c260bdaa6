"""Every error tokenbus raises on purpose, in one tree.

    TokenbusError
    ├── ContractError              a value that the wire contract does not allow
    │   ├── InvalidTag             a tag outside [A-Za-z0-9._:-]{1,128}
    │   ├── InvalidJobId           a job id that could escape its stream key
    │   ├── InvalidJobRequest      a job request that fails validation
    │   └── MalformedEntry         a stream entry that is not a tokenbus v1 entry
    │       └── UnsupportedVersion an entry of a contract version this library does not read
    ├── UnknownGraph               a job names a graph the worker has not registered
    ├── UnknownJob                 a job id that was never enqueued, or whose stream has expired
    ├── GraphLoadError             a `module:attribute` graph path that does not load
    ├── PayloadError               a chunk the graph streamed that cannot be encoded
    ├── PublishError               Redis refused or stayed unreachable while publishing
    ├── ClientStateError           an object used before it was started or after it was closed
    └── CommandError               a command cannot run as asked (a missing extra, an option that does not hold)

Foreign errors (redis-py, pydantic, openai) are translated where they cross into tokenbus,
chained with ``raise ... from``.
"""

from __future__ import annotations


class TokenbusError(Exception):
    """Base class of every tokenbus error."""


class ContractError(TokenbusError, ValueError):
    """A value the wire contract does not allow."""


class InvalidTag(ContractError):
    def __init__(self, tag: object, reason: str) -> None:
        self.tag = tag
        super().__init__(f"invalid tag {shown(tag)}: {reason}")


class InvalidJobId(ContractError):
    def __init__(self, job_id: object, reason: str) -> None:
        self.job_id = job_id
        super().__init__(f"invalid job id {shown(job_id)}: {reason}")


class InvalidJobRequest(ContractError):
    """The job request does not validate; the message lists every problem."""


class MalformedEntry(ContractError):
    """A stream entry that is not a tokenbus entry (missing or mistyped fields)."""


class UnsupportedVersion(MalformedEntry):
    def __init__(self, version: str) -> None:
        self.version = version
        super().__init__(f"entry has contract version {version!r}; this library reads version 1")


class UnknownGraph(TokenbusError, LookupError):
    def __init__(self, name: str, available: list[str], *, served_by: str = "this worker serves") -> None:
        self.name = name
        self.available = available
        names = ", ".join(available) or "none"
        super().__init__(f"unknown graph {name!r}; {served_by}: {names}")


class UnknownJob(TokenbusError, LookupError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(
            f"no job {shown(job_id)}: never enqueued here (check TOKENBUS_PREFIX and TOKENBUS_QUEUE), "
            "or it ended longer ago than TOKENBUS_JOB_TTL"
        )


class GraphLoadError(TokenbusError):
    """A graph import path that does not resolve to a LangGraph graph."""


class PayloadError(TokenbusError, TypeError):
    """A chunk the graph streamed that cannot be encoded as JSON."""


class PublishError(TokenbusError):
    """Entries could not be written to Redis; ``lost`` counts them."""

    def __init__(self, message: str, lost: int = 0) -> None:
        self.lost = lost
        super().__init__(message)


class ClientStateError(TokenbusError, RuntimeError):
    """An object used before it was started or after it was closed."""


class CommandError(TokenbusError):
    """A command cannot run as asked: a pip extra is missing, or an option, role or name given to
    it does not hold. The CLI prints the message as one line and exits 2."""


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a hostile value can be any size."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
