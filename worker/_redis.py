"""Everything tokenbus takes from redis-py's private parts, in one place.

Written for redis-py 5 (checked at import; arq 0.28 caps it below 6). The publisher's wire
(:mod:`tokenbus.worker.wire`) opens a connection with redis-py, so that AUTH, TLS, SELECT and the
RESP version are set up as configured, then writes packed pipelines to its transport and counts
the replies in a protocol of its own: a connection's ``_writer`` is where its transport is.

On a Redis Cluster the publisher writes to each primary on a wire of its own, and asks redis-py's
cluster client where each hash slot lives (:class:`ClusterTopology`): its ``nodes_manager``'s
``get_node_from_slot()`` (the slot table), and a node's ``connection_class`` and
``connection_kwargs`` (how redis-py connects to it: credentials, TLS). These are undocumented
attributes of redis-py 5's ``redis.asyncio.cluster``, not underscored. The table is (re)loaded
with the ``nodes_manager``'s ``initialize()``, which asks its ``startup_nodes`` (every node it
has seen) for ``CLUSTER SLOTS`` in turn until one answers, not with the client's public
``initialize()``: that one then also asks the first primary listed for its ``COMMAND`` table,
and fails while that primary is a node just killed that the others still list (until its
replica takes over), a failover of the shard of slot 0 leaving the publisher without a table.

The public API that would replace them: none in redis-py; the wire would open its own
``asyncio`` connection and repeat redis-py's connection set-up, and the cluster's topology would
be read with ``CLUSTER SHARDS`` by tokenbus itself.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import weakref
from collections.abc import Collection

from redis import exceptions as redis_errors
from redis.asyncio import RedisCluster
from redis.asyncio.connection import AbstractConnection

PRIVATE_NAMES = ("._writer", ".nodes_manager")
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


class ClusterTopology:
    """Which primary serves each hash slot of a Redis Cluster, as ``cluster`` (redis-py's client,
    whose creator closes it) knows it, and new connections to a primary, made as redis-py makes
    them. Nodes are named ``host:port``."""

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster

    async def ready(self) -> None:
        """Load the slot table if the client has none yet (its first command does otherwise)."""
        if not self._cluster.nodes_manager.slots_cache:
            await self.refresh()

    def node_of(self, slot: int) -> str:
        """The primary serving ``slot`` (``ConnectionError`` if none does, as in a failover)."""
        try:
            node = self._cluster.nodes_manager.get_node_from_slot(slot)
        except redis_errors.RedisClusterException as e:
            raise redis_errors.ConnectionError(f"no node serves slot {slot}: {e}") from e
        name: str = node.name
        return name

    def primaries(self) -> set[str]:
        return {node.name for node in self._cluster.get_primaries()}

    def connection(self, name: str) -> AbstractConnection:
        """A new, unconnected connection to node ``name``."""
        node = self._cluster.get_node(node_name=name)
        if node is None:
            raise redis_errors.ConnectionError(f"no node {name} in the cluster")
        connection: AbstractConnection = node.connection_class(**node.connection_kwargs)
        return connection

    async def refresh(self, failed: Collection[str] = ()) -> None:
        """Reload the slot table (after ``MOVED``, a failover, a node lost) from the first known
        node that answers, the ``failed`` ones (``host:port``) asked last. The client's
        connections are left open (others may be using them); those to nodes gone are closed by
        redis-py.

        One reload at a time per client (the topologies of two publishers on one client): a
        reload changes the table of nodes another one walks. The client's own reload runs under
        its private lock, not this one: if it changes the table under this one, this one fails
        (``RuntimeError`` from the walk), as when no node answers, and is tried again later."""
        lock = _RELOADING.setdefault(self._cluster, asyncio.Lock())
        async with lock:
            manager = self._cluster.nodes_manager
            if failed:  # a new dict: a walk in progress goes on over the old one
                manager.startup_nodes = dict(sorted(manager.startup_nodes.items(), key=lambda node: node[0] in failed))
            try:
                await manager.initialize()
            except redis_errors.RedisClusterException as e:  # no node answered: the cluster is away
                raise redis_errors.ConnectionError(f"the cluster's topology could not be read: {e}") from e
            except RuntimeError as e:  # "dictionary changed size during iteration"
                raise redis_errors.ConnectionError(f"the cluster's topology changed while read: {e}") from e


_RELOADING: weakref.WeakKeyDictionary[RedisCluster, asyncio.Lock] = weakref.WeakKeyDictionary()
"""The lock of each client's slot table reloads (:meth:`ClusterTopology.refresh`)."""
