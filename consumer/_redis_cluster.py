"""redis-py's Redis Cluster client as the readers use it: which node serves a stream now, a
connection of a reader's own to it, and a topology refresh after a slot moved or a failover.

The readers take either client (:data:`AnyRedis`). On a cluster, a multi-key command (``XREAD``,
``XREADGROUP``) must name keys of one hash slot (Redis refuses ``CROSSSLOT`` even when the slots
share a node) and go to the node serving that slot (``MOVED``/``ASK`` otherwise): the readers
group their streams by slot (:func:`by_slot`) and read each group on a connection to its node.

Written for redis-py 5.0.1 to 5.x (asserted below), with its public API only: ``keyslot``,
``get_node_from_key``, ``ClusterNode.connection_class``/``connection_kwargs`` (a reader's own
connection, made as the client makes its own), ``execute_command(target_nodes=...)``, and for a
topology refresh ``aclose()`` then ``initialize()``, which is what redis-py itself does after a
connection error. redis-py has no public "refresh the slots map" call (``nodes_manager.initialize()``
is internal, and leaves the replaced nodes' connections to be closed by tasks nobody awaits): when
it has one, :func:`refresh_topology` should use it, sparing the client's other connections.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, TypeAlias, TypeGuard

import redis as redis_py
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection

WRITTEN_FOR = ((5, 0, 1), (6, 0, 0))
"""The redis-py versions (from, before) whose cluster internals this module was written against."""


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


if not WRITTEN_FOR[0] <= _version(redis_py.__version__) < WRITTEN_FOR[1]:  # pragma: no cover
    raise ImportError(
        f"tokenbus's cluster readers were written for redis-py {WRITTEN_FOR[0]} to before {WRITTEN_FOR[1]}, "
        f"not {redis_py.__version__}: check {__name__} against the new version"
    )

AnyRedis: TypeAlias = Redis | RedisCluster
"""A client of one Redis, or of a Redis Cluster: every reader takes either."""

REROUTED: tuple[type[Exception], ...] = (
    redis_errors.MovedError,  # the slot is served by another node now (moved, or a failover)
    redis_errors.AskError,  # the slot is being migrated: read again once it has moved
    redis_errors.TryAgainError,  # a multi-key command during a migration
    redis_errors.ClusterDownError,  # no node serves the slot yet (a failover under way)
    redis_errors.SlotNotCoveredError,  # the client's map of the cluster has no node for the slot
    redis_errors.ClusterError,
)
"""What a cluster answers while its topology changes: refresh it and read again, from the same ids."""


def is_cluster(redis: AnyRedis) -> TypeGuard[RedisCluster]:
    return isinstance(redis, RedisCluster)


def connection_settings(redis: AnyRedis) -> dict[str, Any]:
    """The settings the client makes its connections with (``socket_timeout`` among them)."""
    if isinstance(redis, RedisCluster):
        settings: dict[str, Any] = redis.get_connection_kwargs()
        return settings
    return redis.connection_pool.connection_kwargs


def by_slot(redis: RedisCluster, keys: Iterable[str]) -> list[list[str]]:
    """``keys`` grouped by hash slot, in order of first appearance: what one command may read."""
    groups: dict[int, list[str]] = {}
    for key in keys:
        groups.setdefault(redis.keyslot(key), []).append(key)
    return list(groups.values())


async def node_of(redis: RedisCluster, key: str) -> ClusterNode:
    """The node serving ``key``'s slot, by the client's map of the cluster (made if not yet)."""
    await redis.initialize()
    node = redis.get_node_from_key(key)
    if node is None:  # only with replica=True; kept for the type
        raise redis_errors.SlotNotCoveredError(f"no node serves the slot of {key}")
    return node


async def connect_to_node(node: ClusterNode) -> AbstractConnection:
    """A connection of the caller's own to ``node``, with the client's settings (AUTH, TLS, RESP
    version, and its cluster reply parser: ``MOVED`` and ``ASK`` replies raise their errors)."""
    conn = node.connection_class(**node.connection_kwargs)
    await conn.connect()  # type: ignore[no-untyped-call]
    return conn


async def command_on_node(redis: RedisCluster, node: ClusterNode, *args: Any) -> Any:
    """One command to one node through the client (``CLIENT UNBLOCK`` of a connection there)."""
    return await redis.execute_command(*args, target_nodes=node)


async def refresh_topology(redis: RedisCluster) -> None:
    """Ask the cluster again which node serves which slot (after ``MOVED``, or a node lost). The
    client's connections are closed (commands under way on them fail, and redis-py retries them),
    as redis-py does itself after a connection error."""
    await redis.aclose()
    await redis.initialize()
