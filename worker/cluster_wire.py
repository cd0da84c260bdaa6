"""The publisher's wire to a Redis Cluster: a batch cut by hash slot into one pipeline per primary.

Each batch the publisher takes is cut into its commands (by each item's :class:`Route`), grouped
by the primary serving each command's slot (redis-py's slot table, :class:`ClusterTopology`), and
sent as one pipeline per primary, on a :class:`Wire` (hiredis packing, replies counted in bulk)
per primary, all at once. The batch returns when every command has a reply, so the publisher's
batching and adaptive flush are what they are on one Redis: what is queued while a batch is in
flight goes out as the next batch, to every primary.

Ordering per stream: a stream is one key, so one slot, so one primary at a time. Within a batch
its commands go on one connection, in order; a command that must go again (below) goes with
every later command of its slot, still in order, in a later round of the same batch; and the
next batch leaves only when this one is done. So two pipelines holding commands of one stream
are never in flight at once.

What goes again, and how:

- ``MOVED`` (the slot has moved: a migration ended, a failover): the slot table is reloaded and
  the command goes to the new owner in the next round, right away.
- ``ASK`` (the slot is being migrated and the key is already on the importing node): the command
  goes to that node once, after ``ASKING``, in this round; the slot table is not changed.
- ``TRYAGAIN``, ``CLUSTERDOWN``, ``READONLY``, ``LOADING``, ``MASTERDOWN`` (no primary can take it
  now), and a connection lost or timed out (a node killed mid-batch): the slot table is reloaded
  and the call raises ``ConnectionError``; the publisher backs off and calls again with what is
  left, as it does when one Redis is away, and gives up after ``TOKENBUS_PUBLISH_GIVE_UP``,
  counting as lost only the commands still undelivered (:meth:`ClusterWire.undelivered`).

A pipeline whose connection was lost may have been applied in part; all of it goes again. Its
entries that were applied are then written twice, with the same ``(job, attempt, seq)``: readers
drop the second copy, as they drop the copies of any retried batch. An entry Redis acknowledged
may still be lost in a failover (replication is asynchronous): nothing here can tell.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import NamedTuple

from redis import exceptions as redis_errors
from redis.asyncio import RedisCluster

from tokenbus.consumer.redis_errors import REDIS_UNAVAILABLE
from tokenbus.consumer.resp import pack
from tokenbus.schemas.errors import ClientStateError
from tokenbus.worker._redis import ClusterTopology
from tokenbus.worker.wire import Route, Wire

logger = logging.getLogger(__name__)

ASKING = pack(("ASKING",))
RETRY_LATER = ("TRYAGAIN", "CLUSTERDOWN", "READONLY", "LOADING", "MASTERDOWN")
"""Error replies that mean "not now, not here": the command was not applied; send it again later."""
MAX_REDIRECT_ROUNDS = 5
"""Rounds of ``MOVED`` followed within one call before it backs off as for a lost node."""

Refused = list[tuple[int, redis_errors.ResponseError]]


class _Command(NamedTuple):
    number: int  # its index in the batch
    slot: int
    packed: bytes


def _kind(error: redis_errors.ResponseError) -> str:
    """The first word of an error reply (``MOVED``, ``ASK``, ``ERR``...)."""
    return str(error).split(" ", 1)[0]


class ClusterWire:
    """Writes batches of routed items to a Redis Cluster. One writer at a time (the publisher's)."""

    def __init__(self, cluster: RedisCluster, *, timeout_s: float = 30.0) -> None:
        self._topology = ClusterTopology(cluster)
        self._timeout_s = timeout_s
        self._wires: dict[str, Wire] = {}
        self._todo: list[_Command] = []
        self._refused: Refused = []
        self._reconnects = 0  # of wires closed since (a node gone)
        self.redirects = 0
        """Commands sent again after ``MOVED`` or ``ASK``: read by the metrics endpoint and the tests."""
        self.refreshes = 0
        """Times the slot table was reloaded."""

    @property
    def connects(self) -> int:
        """1 + the connections opened after a failure, over every node (as :attr:`Wire.connects`
        counts for one Redis)."""
        return 1 + self._reconnects + sum(max(0, wire.connects - 1) for wire in self._wires.values())

    @property
    def in_flight(self) -> set[str]:
        """The nodes (``host:port``) with a pipeline in flight."""
        return {node for node, wire in self._wires.items() if wire.busy}

    def load(self, items: Sequence[tuple[bytes, Route | None]]) -> None:
        """Take a new batch: each item's packed commands and their route."""
        todo: list[_Command] = []
        for packed, route in items:
            if route is None:
                raise ClientStateError("a command was queued without its route to a cluster node")
            for slot, command in route.split(packed):
                todo.append(_Command(len(todo), slot, command))
        self._todo, self._refused = todo, []

    def undelivered(self) -> list[int]:
        """The batch's commands not (known to be) written yet, by index."""
        return [command.number for command in self._todo]

    async def execute(self) -> Refused:
        """Write what is left of the batch; return the errors Redis replied with, by command index.
        Raises ``ConnectionError`` while some of it cannot be written (call again to go on)."""
        await self._topology.ready()
        rounds = 0
        while self._todo:
            again, refresh, failure = await self._round()
            self._todo = sorted(again)
            if not self._todo:
                break
            if refresh:
                await self._refresh()
            rounds += 1
            if failure is not None or rounds >= MAX_REDIRECT_ROUNDS:
                raise redis_errors.ConnectionError(
                    f"{len(self._todo)} commands could not be written to the cluster: {failure or 'redirected again'}"
                )
        refused, self._refused = sorted(self._refused), []
        return refused

    async def _round(self) -> tuple[list[_Command], bool, str | None]:
        """Send every command left, one pipeline per primary; what must go again, whether the slot
        table is stale, and why if a node failed."""
        groups: dict[str, list[_Command]] = {}
        again: list[_Command] = []
        failure: str | None = None
        for command in self._todo:
            try:
                node = self._topology.node_of(command.slot)
            except redis_errors.ConnectionError as e:  # the slot has no primary (a failover)
                again.append(command)
                failure = str(e)
                continue
            groups.setdefault(node, []).append(command)
        replies = await asyncio.gather(
            *(self._send(node, group) for node, group in groups.items()), return_exceptions=True
        )
        refresh = failure is not None
        asks: list[tuple[str, _Command]] = []
        for (node, group), reply in zip(groups.items(), replies, strict=True):
            if isinstance(reply, BaseException):
                if not isinstance(reply, REDIS_UNAVAILABLE):
                    raise reply
                logger.warning("writing %d commands to cluster node %s failed: %s", len(group), node, reply)
                again.extend(group)  # all of it: what was applied is written twice, and dropped by readers
                refresh, failure = True, f"node {node}: {reply}"
                continue
            for position, error in reply:
                command = group[position]
                word = _kind(error)
                if word == "ASK":
                    asks.append((str(error).split()[-1], command))
                elif word == "MOVED":
                    again.append(command)
                    refresh = True
                    self.redirects += 1
                elif word in RETRY_LATER:
                    again.append(command)
                    refresh, failure = True, f"node {node}: {error}"
                else:
                    self._refused.append((command.number, error))
        if asks:
            self.redirects += len(asks)
            failure = await self._asked(asks, again) or failure
        return again, refresh, failure

    async def _asked(self, asks: list[tuple[str, _Command]], again: list[_Command]) -> str | None:
        """Send each ``ASK``-ed command to the node named, after ``ASKING``, unless an earlier
        command of its slot goes again (it would overtake it): then it goes again too."""
        waiting = {command.slot for command in again}
        targets: dict[str, list[_Command]] = {}
        for node, command in asks:
            if command.slot in waiting:
                again.append(command)
            else:
                targets.setdefault(node, []).append(command)
        failure = None
        for node, group in targets.items():
            try:
                packed = b"".join(ASKING + command.packed for command in group)
                errors = await self._wire(node).execute(packed, 2 * len(group))
            except REDIS_UNAVAILABLE as e:
                again.extend(group)
                failure = f"node {node}: {e}"
                continue
            failed = {position // 2 for position, _ in errors}  # ASKING's reply, or the command's
            for position, error in errors:
                if position % 2 == 1 and _kind(error) not in ("ASK", "MOVED", *RETRY_LATER):
                    self._refused.append((group[position // 2].number, error))  # refused for good
                    failed.discard(position // 2)
            again.extend(group[i] for i in sorted(failed))
        return failure

    async def _send(self, node: str, group: list[_Command]) -> Refused:
        """One pipeline to ``node``; errors by position in ``group``."""
        return await self._wire(node).execute(b"".join([command.packed for command in group]), len(group))

    def _wire(self, node: str) -> Wire:
        wire = self._wires.get(node)
        if wire is None:
            wire = self._wires[node] = Wire(
                timeout_s=self._timeout_s, connection=lambda: self._topology.connection(node)
            )
        return wire

    async def _refresh(self) -> None:
        """Reload the slot table; close the wires of nodes that no longer serve a slot."""
        self.refreshes += 1
        try:
            await self._topology.refresh()
        except redis_errors.ConnectionError as e:
            logger.warning("reloading the cluster's slot table failed: %s", e)
            return
        primaries = self._topology.primaries()
        for node in [node for node in self._wires if node not in primaries]:
            wire = self._wires.pop(node)
            self._reconnects += max(0, wire.connects - 1)
            await wire.close()

    async def close(self) -> None:
        for wire in self._wires.values():
            await wire.close()
        self._wires.clear()
