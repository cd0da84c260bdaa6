"""Everything tokenbus takes from redis-py's private parts, in one place.

Written for redis-py 5 (checked at import; arq 0.28 caps it below 6). The publisher's wire
(:mod:`tokenbus.worker.wire`) opens a connection with redis-py, so that AUTH, TLS, SELECT and the
RESP version are set up as configured, then writes packed pipelines to its transport and counts
the replies in a protocol of its own: a connection's ``_writer`` is where its transport is.

The public API that would replace it: none in redis-py; the wire would open its own
``asyncio`` connection and repeat redis-py's connection set-up.
"""

from __future__ import annotations

import asyncio
import importlib.metadata

from redis.asyncio.connection import AbstractConnection

PRIVATE_NAMES = ("._writer",)
"""What this module uses of the library's private parts: no other module of tokenbus may (tests/test_layers.py)."""
WRITTEN_FOR = ("5",)
"""The redis-py major versions this module was written and tested against."""

_version = importlib.metadata.version("redis")
if _version.split(".")[0] not in WRITTEN_FOR:
    raise ImportError(f"tokenbus's publisher uses private parts of redis-py 5, and redis-py {_version} is installed")


def transport_of(conn: AbstractConnection) -> asyncio.WriteTransport | None:
    """The transport of a connected redis-py connection (None once it is closed)."""
    writer = conn._writer
    return None if writer is None else writer.transport
