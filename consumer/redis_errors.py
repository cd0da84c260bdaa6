"""What redis-py raises when Redis cannot be reached: the errors every reader and writer retries."""

from __future__ import annotations

from redis import exceptions as redis_errors

REDIS_UNAVAILABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)
"""What redis-py raises when Redis cannot be reached or did not answer: retry later, on a new connection."""

PASSING_REFUSALS = ("OOM", "BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS")
"""First words of error replies that refuse a command for now, not for good: Redis is at
``maxmemory``, busy with a script, loading, a replica, without its master or its slot's primary.
Others (``WRONGTYPE``, ``NOPERM``, ``ERR`` ...) say the command is wrong for that key or user:
sent again, it is refused again."""


def may_pass(error: redis_errors.ResponseError) -> bool:
    """Whether the command an error reply refused may be taken if it is sent again later."""
    return str(error).split(" ", 1)[0] in PASSING_REFUSALS
