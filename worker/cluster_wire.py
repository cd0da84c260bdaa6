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

What is delivered is known per command: a command leaves the batch as soon as its node's reply to
it is in (written, or refused for good), in whichever round or call, and nothing puts it back
until the next batch is loaded. So when the publisher gives up, what the healthy nodes took in an
earlier call is not counted lost (nor sent again in the meantime).

The slot table is reloaded from whichever known node answers first, the nodes that just failed
asked last (:meth:`ClusterTopology.refresh`): a node killed is often still listed by the others
until its replica takes over, and asking it first would only wait for its timeout.

A pipeline whose connection was lost may have been applied in part; all of it goes again. Its
entries that were applied are then written twice, with the same ``(job, attempt, seq)``: readers
drop the second copy, as they drop the copies of any retried batch. An entry Redis acknowledged
may still be lost in a failover (replication is asynchronous): without ``WAIT``, nothing here can tell.

With ``wait_replicas`` (``TOKENBUS_WAIT_REPLICAS``), every pipeline ends with ``WAIT <replicas>
<timeout>`` on its own connection, those to an importing node after ``ASK`` included. ``WAIT``
counts the replicas of that connection's node that have every write made on it so far: exactly
the commands of that pipeline (and the earlier ones on it, already judged). So each command is
judged by the ``WAIT`` of the pipeline that wrote it for good: those of a pipeline whose ``WAIT``
answered fewer replicas (or failed) are noted unacknowledged (:meth:`ClusterWire.unacknowledged`);
a command that goes again (``MOVED``, ``ASK``, retried, its connection lost) is judged where it
goes, not where it was turned away. A command refused for good is refused, not unacknowledged.
"""

from __future__ import annotations

import asyncio
import itertools
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
    item: int  # the index of the item it was queued in
    slot: int
    packed: bytes


def _kind(error: redis_errors.ResponseError) -> str:
    """The first word of an error reply (``MOVED``, ``ASK``, ``ERR``...)."""
    return str(error).split(" ", 1)[0]


class ClusterWire:
    """Writes batches of routed items to a Redis Cluster. One writer at a time (the publisher's)."""

    def __init__(
        self, cluster: RedisCluster, *, timeout_s: float = 30.0, wait_replicas: int = 0, wait_timeout_ms: int = 1000
    ) -> None:
        self._topology = ClusterTopology(cluster)
        self._timeout_s = timeout_s
        self._wires: dict[str, Wire] = {}
        self._left: dict[int, _Command] = {}  # the batch's commands with no reply yet, by index, in order
        self._sizes: list[int] = []  # commands per item of the batch
        self._refused: Refused = []
        self._unacked: list[int] = []  # the batch's commands written whose pipeline's WAIT fell short
        self.wait_replicas = wait_replicas
        """Replicas each pipeline's ``WAIT`` asks for (0: no ``WAIT``)."""
        self.wait_timeout_ms = wait_timeout_ms
        self._wait = pack(("WAIT", wait_replicas, wait_timeout_ms)) if wait_replicas else b""
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
        left: dict[int, _Command] = {}
        sizes: list[int] = []
        for item, (packed, route) in enumerate(items):
            if route is None:
                raise ClientStateError("a command was queued without its route to a cluster node")
            commands = route.split(packed)
            for slot, command in commands:
                left[len(left)] = _Command(len(left), item, slot, command)
            sizes.append(len(commands))
        self._left, self._sizes, self._refused, self._unacked = left, sizes, [], []

    def retain(self, items: Sequence[int]) -> tuple[list[int], list[int]]:
        """Keep only the batch's ``items`` (indexes, ascending), renumbered as the batch of those
        items (an attempt fenced between two calls: its items are dropped). What was written
        stays written; returns the commands of the items dropped that were (by index before):
        those acknowledged, and those too few replicas acknowledged (``WAIT``)."""
        starts = [0, *itertools.accumulate(self._sizes)]
        numbers: dict[int, int] = {}  # old command index -> new
        for item in items:
            for offset in range(self._sizes[item]):
                numbers[starts[item] + offset] = len(numbers)
        answered = set(self._left) | {number for number, _ in self._refused}
        unacked = set(self._unacked)
        dropped = [number for number in range(starts[-1]) if number not in numbers and number not in answered]
        new_items = {item: new_item for new_item, item in enumerate(items)}
        self._left = {
            numbers[number]: command._replace(number=numbers[number], item=new_items[command.item])
            for number, command in self._left.items()
            if number in numbers
        }
        self._refused = [(numbers[number], error) for number, error in self._refused if number in numbers]
        self._unacked = [numbers[number] for number in self._unacked if number in numbers]
        self._sizes = [self._sizes[item] for item in items]
        return [n for n in dropped if n not in unacked], [n for n in dropped if n in unacked]

    def undelivered(self) -> list[int]:
        """The batch's commands Redis has not acknowledged (written or refused) yet, by index."""
        return list(self._left)

    def refused(self) -> Refused:
        """The batch's commands refused for good so far, with Redis's error, by index; forgotten."""
        refused, self._refused = sorted(self._refused, key=lambda pair: pair[0]), []
        return refused

    def unacknowledged(self) -> list[int]:
        """The batch's commands written so far by a pipeline whose ``WAIT`` answered fewer than
        ``wait_replicas`` replicas (or failed), by index; forgotten."""
        unacked, self._unacked = sorted(self._unacked), []
        return unacked

    async def execute(self) -> Refused:
        """Write what is left of the batch; return the errors Redis replied with, by command index.
        Raises ``ConnectionError`` while some of it cannot be written (call again to go on)."""
        await self._topology.ready()
        rounds = 0
        while self._left:
            refresh, failure, failed = await self._round()
            if not self._left:
                break
            if refresh:
                await self._refresh(failed)
            rounds += 1
            if failure is not None or rounds >= MAX_REDIRECT_ROUNDS:
                raise redis_errors.ConnectionError(
                    f"{len(self._left)} commands could not be written to the cluster: {failure or 'redirected again'}"
                )
        return self.refused()

    async def _round(self) -> tuple[bool, str | None, set[str]]:
        """Send every command left, one pipeline per primary, and drop from the batch each one a
        reply answered for good; whether the slot table is stale, why if a node failed, and the
        nodes that failed."""
        groups: dict[str, list[_Command]] = {}
        again: list[_Command] = []
        failure: str | None = None
        failed: set[str] = set()
        for command in self._left.values():
            try:
                node = self._topology.node_of(command.slot)
            except redis_errors.ConnectionError as e:  # the slot has no primary (a failover)
                again.append(command)
                failure = str(e)
                continue
            groups.setdefault(node, []).append(command)
        replies = await asyncio.gather(
            *(self._send(node, b"".join([c.packed for c in group]), len(group)) for node, group in groups.items()),
            return_exceptions=True,
        )
        refresh = failure is not None
        asks: list[tuple[str, _Command]] = []
        unexpected: BaseException | None = None
        for (node, group), reply in zip(groups.items(), replies, strict=True):
            if isinstance(reply, BaseException):
                if not isinstance(reply, REDIS_UNAVAILABLE):
                    unexpected = unexpected or reply  # raised once every reply in is counted
                    continue
                logger.warning("writing %d commands to cluster node %s failed: %s", len(group), node, reply)
                again.extend(group)  # all of it: what was applied is written twice, and dropped by readers
                refresh, failure = True, f"node {node}: {reply}"
                failed.add(node)
                continue
            stale, busy = self._answered(node, group, reply, again, asks)
            refresh, failure = refresh or stale, busy or failure
        if unexpected is not None:
            raise unexpected
        if asks:
            self.redirects += len(asks)
            failure = await self._asked(asks, again, failed) or failure
        return refresh, failure, failed

    def _answered(
        self,
        node: str,
        group: list[_Command],
        reply: tuple[Refused, object],
        again: list[_Command],
        asks: list[tuple[str, _Command]],
    ) -> tuple[bool, str | None]:
        """Sort the commands of a pipeline ``node`` answered (its errors, its ``WAIT``'s reply):
        each written or refused for good leaves the batch (those written judged by the ``WAIT``),
        the others go to ``again`` or, redirected by ``ASK``, to ``asks``. Whether the slot table
        is stale, and why the node could not take some now."""
        errors, replicas = dict(reply[0]), reply[1]
        refresh, failure = False, None
        written: list[int] = []
        for position, command in enumerate(group):
            error = errors.get(position)
            word = None if error is None else _kind(error)
            if word == "ASK":
                asks.append((str(error).split()[-1], command))
                continue
            if word == "MOVED":
                again.append(command)
                refresh = True
                self.redirects += 1
                continue
            if word in RETRY_LATER:
                again.append(command)
                refresh, failure = True, f"node {node}: {error}"
                continue
            if error is None:
                written.append(command.number)
            else:
                self._refused.append((command.number, error))
            del self._left[command.number]  # written, or refused for good
        self._judge(node, written, replicas)
        return refresh, failure

    async def _asked(self, asks: list[tuple[str, _Command]], again: list[_Command], failed: set[str]) -> str | None:
        """Send each ``ASK``-ed command to the node named, after ``ASKING``, unless an earlier
        command of its slot goes again (it would overtake it): then it goes again too. Those
        answered for good leave the batch, judged by that pipeline's ``WAIT``; ``failed`` gets
        the nodes that failed."""
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
                errors, replicas = await self._send(node, packed, 2 * len(group))
            except REDIS_UNAVAILABLE as e:
                again.extend(group)
                failure = f"node {node}: {e}"
                failed.add(node)
                continue
            retry = {position // 2 for position, _ in errors}  # ASKING's reply, or the command's
            refused: set[int] = set()
            for position, error in errors:
                if position % 2 == 1 and _kind(error) not in ("ASK", "MOVED", *RETRY_LATER):
                    self._refused.append((group[position // 2].number, error))  # refused for good
                    retry.discard(position // 2)
                    refused.add(position // 2)
            written: list[int] = []
            for i, command in enumerate(group):
                if i in retry:
                    again.append(command)
                    continue
                if i not in refused:
                    written.append(command.number)
                del self._left[command.number]
            self._judge(node, written, replicas)
        return failure

    async def _send(self, node: str, packed: bytes, count: int) -> tuple[Refused, object]:
        """One pipeline of ``count`` packed commands to ``node``, ending with ``WAIT`` when asked
        for: the errors Redis replied with, by position, and ``WAIT``'s reply (None without)."""
        wire = self._wire(node)
        if not self._wait:
            return await wire.execute(packed, count), None
        errors = await wire.execute(packed + self._wait, count + 1)
        if errors and errors[-1][0] == count:  # WAIT refused: its error is its reply
            return errors[:-1], errors[-1][1]
        return errors, wire.last_reply

    def _judge(self, node: str, written: list[int], replicas: object) -> None:
        """Note the commands a pipeline to ``node`` wrote (by index) unacknowledged if its ``WAIT``
        answered ``replicas`` fewer than ``wait_replicas``, or failed."""
        if not self._wait or not written:
            return
        if isinstance(replicas, int) and replicas >= self.wait_replicas:
            return
        self._unacked.extend(written)
        if isinstance(replicas, int):
            logger.warning(
                "%d commands written to cluster node %s acknowledged by %d of %d replicas within %d ms",
                len(written), node, replicas, self.wait_replicas, self.wait_timeout_ms,
            )  # fmt: skip
        else:
            logger.error(
                "WAIT after a publish pipeline to cluster node %s failed (%r): its %d commands count as unacknowledged",
                node, replicas, len(written),
            )  # fmt: skip

    def _wire(self, node: str) -> Wire:
        wire = self._wires.get(node)
        if wire is None:
            wire = self._wires[node] = Wire(
                timeout_s=self._timeout_s, connection=lambda: self._topology.connection(node)
            )
        return wire

    async def _refresh(self, failed: set[str]) -> None:
        """Reload the slot table (``failed`` nodes asked last); close the wires of nodes that no
        longer serve a slot."""
        self.refreshes += 1
        try:
            await self._topology.refresh(failed)
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
