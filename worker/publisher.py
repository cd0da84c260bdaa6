"""The publisher: one adaptive, pipelined writer per worker, shared by all of its jobs.

Jobs append entries without awaiting (:meth:`Publisher.send`); one writer task sends everything
buffered as one pipeline as soon as the previous pipeline has returned, so at low load a token
waits one round trip and at high load batches grow (up to ``batch_max``) instead of the queue.
When Redis is unreachable the writer retries the batch with backoff for ``give_up_s``; past that
the batch is counted as lost on each job's :class:`Sink`, which the job turns into an ``error``
entry. Past ``buffer_max`` queued entries, :meth:`Publisher.wait_writable` makes producers that
can wait do so (a model's token callback); a node's ``writer(...)`` call cannot, so its payloads
are buffered past it (``worker.streaming``). A retried batch may be applied twice; consumers drop
the copies by ``(job, attempt, seq)``.

On a Redis Cluster (a :class:`RedisCluster` client) each queued item carries its :class:`Route`
(the hash slot of each command's key) and each batch goes out as one pipeline per primary
(:mod:`tokenbus.worker.cluster_wire`, which says how order is kept and redirections followed).

With ``coalesce_after`` set (``TOKENBUS_COALESCE=adaptive``), the publisher counts as congested
while that many calls wait in its buffer: then a job may :meth:`Publisher.replace` its last call
still waiting with one that holds more (``worker.coalesce`` merges chunks of one model call into
it). Nothing waits to be merged: only what is in the buffer anyway, behind a batch in flight.

With ``wait_replicas`` set (``TOKENBUS_WAIT_REPLICAS``), each batch ends with ``WAIT <replicas>
<timeout>`` on the same connection: its entries count as written only once that many replicas
acknowledged them. Those of a batch fewer replicas acknowledged within the timeout are counted
on each job's :class:`Sink` as unacknowledged (Redis holds them, but a failover may lose them),
and the job ends with an ``error`` that says how many. On a Redis Cluster, ``WAIT`` counts the
replicas of its connection's node only, so each primary's pipeline ends with one of its own and
each stream entry is judged by the ``WAIT`` of the pipeline that wrote it (``cluster_wire``):
the entries a batch wrote to a primary short of replicas are unacknowledged, the others not.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol, cast

from redis import exceptions as redis_errors
from redis.asyncio import Redis, RedisCluster

from tokenbus.consumer.redis_errors import REDIS_UNAVAILABLE, may_pass
from tokenbus.consumer.resp import pack
from tokenbus.schemas.errors import ClientStateError, PublishError
from tokenbus.worker.cluster_wire import ClusterWire
from tokenbus.worker.stats import BATCH_SIZES, SECONDS, Buckets
from tokenbus.worker.wire import ChunkTemplate, Route, Wire, XaddPacker, describe

logger = logging.getLogger(__name__)

_Item = tuple["Sink", bytes, int, int, Route | None]
"""What one call queued for a job: its commands packed in the Redis protocol, how many, how
many of them are stream entries (``XADD``; the others are a job's ``ZADD``, ``ZREM``, ``EXPIRE``),
and, for a Redis Cluster, their route."""


class Sink:
    """What one job has queued, written and lost; the job waits on it with :meth:`flushed`."""

    __slots__ = ("_publisher", "fenced", "job_id", "last_index", "lost", "refusal", "refused", "transient", "unacked")

    def __init__(self, publisher: Publisher, job_id: str) -> None:
        self._publisher = publisher
        self.job_id = job_id
        self.last_index = 0
        self.lost = 0
        self.unacked = 0
        """Stream entries Redis took but fewer than ``wait_replicas`` replicas acknowledged in time."""
        self.refused = 0
        """Commands Redis answered with an error (``WRONGTYPE``, ``OOM`` at ``maxmemory``...)."""
        self.refusal = ""
        """The first of those errors, with the command it refused."""
        self.transient = 0
        """Those of the refusals that may pass if the command is sent again later (:func:`may_pass`)."""
        self.fenced = False
        """The attempt lost its lease (:mod:`tokenbus.worker.lease`): nothing more of it is written."""

    async def flushed(self) -> None:
        """Wait until every command queued so far for this job has been written (or counted lost)."""
        await self._publisher.wait_done(self.last_index)

    def check(self) -> None:
        """Raise :class:`PublishError` if anything this job queued was lost, refused or (with
        ``wait_replicas``) not acknowledged by enough replicas."""
        if self.lost or self.refused or self.unacked:
            raise self.failure()

    def failure(self) -> PublishError:
        """What was lost, refused or not acknowledged so far, as the error the job ends with."""
        lost = self.lost + self.refused
        parts = []
        if lost:
            detail = f"; Redis said: {self.refusal}" if self.refusal else ""
            parts.append(f"{lost} stream entries of job {self.job_id} could not be written to Redis{detail}")
        if self.unacked:
            replicas, timeout_ms = self._publisher.wait_replicas, self._publisher.wait_timeout_ms
            parts.append(
                f"{self.unacked} stream entries of job {self.job_id} were written but not acknowledged by "
                f"{replicas} replica{'s' if replicas != 1 else ''} within {timeout_ms} ms (a failover may lose them)"
            )
        return PublishError("; ".join(parts), lost=lost)


class Fence(Protocol):
    """What the writer asks before each batch whether the jobs it writes for still own them."""

    def expired(self) -> bool: ...
    async def confirm(self) -> None: ...
    def fenced(self) -> int: ...


class Publisher:
    def __init__(
        self,
        redis: Redis | RedisCluster,
        *,
        batch_max: int = 4096,
        buffer_max: int = 100_000,
        give_up_s: float = 30.0,
        backoff_s: Sequence[float] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
        yield_every: int = 64,
        coalesce_after: int | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self._cluster: ClusterWire | None = None
        self._wire: Wire | None = None
        if isinstance(redis, RedisCluster):
            self._cluster = ClusterWire(redis, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms)
        else:
            self._wire = Wire(cast(Redis, redis))  # (mypy does not narrow redis-py's union)
        self._xadd = XaddPacker()
        self._batch_max = batch_max
        self._buffer_max = buffer_max
        self._give_up_s = give_up_s
        self._backoff_s = tuple(backoff_s)
        self._queue: list[_Item] = []
        self._queued = 0  # items ever queued
        self._taken = 0  # items ever taken by the writer: the queue holds items _taken + 1 to _queued
        self.coalesce_after = coalesce_after
        """Calls waiting from which chunks are merged (``TOKENBUS_COALESCE_AFTER``); None: never."""
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._wait = pack(("WAIT", wait_replicas, wait_timeout_ms)) if wait_replicas else b""
        self._done = 0  # items ever written or counted lost
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._yield_every = yield_every
        self._next_yield = yield_every
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.fence: Fence | None = None
        # What the metrics endpoint reads (worker/metrics.py): plain ints and buckets, counted per
        # batch by the writer, never per entry.
        self.retries = 0
        """Batches sent again after Redis failed them."""
        self.failures = 0
        """Pipelines that failed (Redis unreachable, a timeout): each retry, and each batch given up."""
        self.lost_total = 0
        """Commands given up after ``give_up_s`` of failures."""
        self.entries_written = 0
        """Stream entries Redis accepted (every tag-stream copy counts)."""
        self.entries_lost = 0
        """Stream entries given up or refused by Redis (``OOM`` at ``maxmemory``, say)."""
        self.batch_sizes = Buckets(BATCH_SIZES)
        """Commands per pipeline written."""
        self.round_trips = Buckets(SECONDS)
        """Seconds from sending a pipeline to its last reply, for each one written."""
        self.entries_unacknowledged = 0
        """Stream entries Redis took but fewer than ``wait_replicas`` replicas acknowledged in time."""
        self.chunks_merged = 0
        """Chunks merged into the entry of the chunk before them (``coalesce_after``), not written alone."""

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Publisher:
        if self._task is not None:
            raise ClientStateError("publisher already started")
        self._task = asyncio.create_task(self._run(), name="tokenbus-publisher")
        return self

    async def close(self) -> None:
        """Write everything queued (retrying as usual), then stop. Does not close the Redis client."""
        if self._task is None:
            return
        self._closing = True
        self._wake.set()
        await self._task
        self._task = None
        if self._cluster is not None:
            await self._cluster.close()
        if self._wire is not None:
            await self._wire.close()

    # -- producing -------------------------------------------------------------------------------
    def sink(self, job_id: str) -> Sink:
        return Sink(self, job_id)

    def xadd(self, sink: Sink, streams: Sequence[tuple[str, int]], fields: list[Any]) -> None:
        """Queue ``XADD key MAXLEN ~ maxlen * fields...`` on each ``(key, maxlen)`` of ``streams``
        for ``sink``'s job. Never blocks."""
        commands = self._xadd.pack(streams, fields)
        route = None if self._cluster is None else Route.of([key for key, _ in streams], commands)
        self.send(sink, b"".join(commands), len(commands), route=route)

    def command(self, sink: Sink, args: tuple[Any, ...]) -> None:
        """Queue any other command (``EXPIRE``, ``ZADD``...: its key second) in order with the job's entries."""
        packed = pack(args)
        self.send(sink, packed, 1, entries=0, route=None if self._cluster is None else Route.of([args[1]], [packed]))

    def template(self, streams: Sequence[tuple[str, int]], fields: list[Any]) -> ChunkTemplate:
        """A template for the chunks of one model call (see :class:`ChunkTemplate`); queue what it
        packs with :meth:`send`, with its ``route``."""
        template = self._xadd.template(streams, fields)
        if self._cluster is not None:
            template.route = Route([key for key, _ in streams], template.fixed)
        return template

    def send(
        self, sink: Sink, packed: bytes, count: int, *, entries: int | None = None, route: Route | None = None
    ) -> None:
        """Queue ``count`` commands already packed (by a :meth:`template`) for ``sink``'s job, of
        which ``entries`` (default: all) are stream entries; ``route``: where they go on a Redis
        Cluster (the template's). Never blocks."""
        if self._task is None or self._closing:
            raise ClientStateError("publisher is not running")
        self._queue.append((sink, packed, count, count if entries is None else entries, route))
        self._queued += 1
        sink.last_index = self._queued
        if not self._wake.is_set():
            self._wake.set()
        if len(self._queue) >= self._buffer_max and self._writable.is_set():
            self._writable.clear()

    @property
    def reconnects(self) -> int:
        """Connections the writer opened after its first (each after a failure)."""
        wire = self._cluster or self._wire
        return 0 if wire is None else max(0, wire.connects - 1)

    @property
    def buffered(self) -> int:
        """Calls queued and not yet taken by the writer (each one entry or a chunk's copies)."""
        return len(self._queue)

    @property
    def congested(self) -> bool:
        return not self._writable.is_set()

    @property
    def coalescing(self) -> bool:
        """Whether chunks should be merged now: coalescing is on and ``coalesce_after`` calls
        wait in the buffer (Redis or the writer does not keep up)."""
        after = self.coalesce_after
        return after is not None and len(self._queue) >= after

    def waiting(self, sink: Sink, index: int) -> bool:
        """Whether the call ``sink`` queued as ``index`` (its ``last_index`` then) is still in the
        buffer, not yet taken by the writer, and nothing of the job was queued after it."""
        return index > self._taken and index == sink.last_index

    def replace(self, sink: Sink, index: int, packed: bytes) -> None:
        """Put ``packed`` in place of the call ``sink`` queued as ``index``, which must be
        :meth:`waiting`: the same commands (as many, to the same keys), holding more. On a Redis
        Cluster the call's route cuts them (a merged chunk's commands as its template's: :class:`Route`)."""
        if not self.waiting(sink, index):
            raise ClientStateError(f"call {index} of job {sink.job_id} is no longer waiting")
        position = index - self._taken - 1
        _, _, count, entries, route = self._queue[position]
        self._queue[position] = (sink, packed, count, entries, route)

    def should_yield(self) -> bool:
        """True once per ``yield_every`` items queued. The writer is a task of the same event loop:
        a model that never suspends (one that answers from memory) would starve it until the job
        ends, and the job would then wait for all of its writes at once. Producers that can
        suspend (a model's token callback) yield to the loop (``await asyncio.sleep(0)``) when
        this says so, and writing overlaps producing."""
        if self._queued < self._next_yield:
            return False
        self._next_yield = self._queued + self._yield_every
        return True

    async def wait_writable(self) -> None:
        """Wait while the buffer is over ``buffer_max`` (Redis slow or away)."""
        await self._writable.wait()

    async def wait_done(self, index: int) -> None:
        if index <= self._done:
            return
        if self._task is None or self._task.done():
            raise ClientStateError("the publisher stopped before writing this job's entries")
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (index, id(future), future))
        await future

    # -- the writer ------------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._write_forever()
        finally:  # stopped (cancelled, say) with jobs waiting: they must not wait forever
            for _, _, future in self._waiters:
                if not future.done():
                    future.set_exception(ClientStateError("the publisher stopped before writing this job's entries"))
            self._waiters.clear()

    async def _write_forever(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._queue) <= self._batch_max:
                batch, self._queue = self._queue, []
            else:
                batch = self._queue[: self._batch_max]
                del self._queue[: self._batch_max]
            taken = len(batch)
            self._taken += taken
            if not self._writable.is_set() and len(self._queue) < self._buffer_max // 2:
                self._writable.set()
            try:
                await self._write(batch)
            except Exception as e:  # a bug in counting what failed: lose this batch, not the writer
                logger.exception("publishing %d entries failed unexpectedly", len(batch))
                self._lose(batch, e, 0.0)
            self._done += taken
            self._release_waiters()

    async def _unfenced(self, batch: list[_Item]) -> list[int] | None:
        """The indexes of the batch's items to keep if some are of attempts that lost their
        lease (None if none is). A lease that may have lapsed unnoticed (the worker stalled) is
        confirmed first: nothing is written before."""
        fence = self.fence
        if fence is None:
            return None
        if fence.expired():
            await fence.confirm()
        if fence.fenced() and any(item[0].fenced for item in batch):
            return [i for i, item in enumerate(batch) if not item[0].fenced]
        return None

    async def _write(self, batch: list[_Item]) -> None:
        """Write ``batch``, retrying while Redis is away; past ``give_up_s``, count what is left
        of it lost. On a cluster, what the nodes acknowledged in any call stays written: the
        batch is loaded once, and later calls write only the rest (:class:`ClusterWire`)."""
        started = time.monotonic()
        attempt = 0
        packed, count, loaded = b"", 0, False
        cluster, wire = self._cluster, self._wire
        while True:
            try:
                kept = await self._unfenced(batch)
                if kept is not None:
                    if loaded and cluster is not None:  # what the nodes took of the items dropped is written
                        written, unacked = cluster.retain(kept)
                        self.entries_written += _entries(_of_commands(batch, written))
                        self._unacknowledged(_of_commands(batch, unacked))
                    else:
                        loaded = False
                    batch = [batch[i] for i in kept]
                if not loaded:
                    if cluster is None:
                        packed = b"".join([commands for _, commands, _, _, _ in batch])
                    else:
                        cluster.load([(commands, route) for _, commands, _, _, route in batch])
                    loaded = True
                count = sum([n for _, _, n, _, _ in batch])
                if not batch:
                    return
                sent = time.monotonic()
                if cluster is not None:  # (WAIT, if any, ends each node's pipeline: judged there)
                    refused = await cluster.execute()
                elif self._wait:  # (WAIT's reply is the last: its index is count)
                    refused = await _single(wire).execute(packed + self._wait, count + 1)
                else:
                    refused = await _single(wire).execute(packed, count)
            except REDIS_UNAVAILABLE as e:
                self.failures += 1
                waited = time.monotonic() - started
                if waited >= self._give_up_s:
                    self._give_up(batch, e, waited, loaded)
                    return
                delay = self._backoff_s[min(attempt, len(self._backoff_s) - 1)]
                attempt += 1
                self.retries += 1
                logger.warning("publishing %d entries failed (%s); retry %d in %.2fs", len(batch), e, attempt, delay)
                await asyncio.sleep(min(delay, max(0.0, self._give_up_s - waited)))
                continue
            except Exception as e:  # a bug or an unexpected reply: lose what is left of the batch, not the writer
                logger.exception("publishing %d entries failed unexpectedly", len(batch))
                self._give_up(batch, e, time.monotonic() - started, loaded)
                return
            self.round_trips.observe(time.monotonic() - sent)
            self._written(batch, refused, count)
            return

    def _written(self, batch: list[_Item], refused: list[tuple[int, redis_errors.ResponseError]], count: int) -> None:
        """Count a batch of ``count`` commands written, but those ``refused`` (and, with
        ``wait_replicas``, those not acknowledged by enough replicas)."""
        self.batch_sizes.observe(count)
        entries = _entries(batch)
        if self._cluster is not None:
            entries -= self._unacknowledged(_of_commands(batch, self._cluster.unacknowledged()))
        elif self._wait:
            refused, unacked = self._acknowledged(batch, refused, count)
            entries -= unacked
        if refused:
            entries -= self._refused(batch, refused)
        self.entries_written += entries

    def _give_up(self, batch: list[_Item], error: BaseException, waited: float, loaded: bool) -> None:
        """Count ``batch`` lost; on a cluster whose wire holds it (``loaded``), only the commands
        no node acknowledged: those written count as written (or, with ``wait_replicas``, as
        unacknowledged if their pipeline's ``WAIT`` fell short), those refused as refused."""
        cluster = self._cluster
        if cluster is None or not loaded:
            self._lose(batch, error, waited)
            return
        undelivered = cluster.undelivered()
        refused = cluster.refused()
        entries = _entries(batch) - _entries(_of_commands(batch, undelivered))
        entries -= self._unacknowledged(_of_commands(batch, cluster.unacknowledged()))
        if refused:
            entries -= self._refused(batch, refused)
        self.entries_written += entries
        self._lose(batch, error, waited, undelivered)

    def _acknowledged(
        self, batch: list[_Item], refused: list[tuple[int, redis_errors.ResponseError]], count: int
    ) -> tuple[list[tuple[int, redis_errors.ResponseError]], int]:
        """After a batch ending with ``WAIT``: the error replies to its own commands, and how many of
        its stream entries Redis took (not refused) that fewer than ``wait_replicas`` replicas
        acknowledged (every one, or none), counted on their jobs' sinks."""
        replicas = _single(self._wire).last_reply
        waited = [error for index, error in refused if index == count]
        refused = [(index, error) for index, error in refused if index != count]
        if waited or not isinstance(replicas, int):
            logger.error("WAIT after a publish pipeline failed: %s", waited[0] if waited else repr(replicas))
            replicas = -1
        if replicas >= self.wait_replicas:
            return refused, 0
        refused_at = {index for index, _ in refused}
        unacked = self._unacknowledged(_of_commands(batch, [i for i in range(count) if i not in refused_at]))
        if unacked:
            logger.warning(
                "%d stream entries acknowledged by %d of %d replicas within %d ms",
                unacked, max(replicas, 0), self.wait_replicas, self.wait_timeout_ms,
            )  # fmt: skip
        return refused, unacked

    def _unacknowledged(self, items: list[_Item]) -> int:
        """Count the stream entries of ``items`` (as :func:`_of_commands` cuts them: those written
        that too few replicas acknowledged) on their jobs' sinks; return how many."""
        unacked = 0
        for sink, _, _, xadds, _ in items:
            sink.unacked += xadds
            unacked += xadds
        self.entries_unacknowledged += unacked
        return unacked

    def _refused(self, batch: list[_Item], refused: list[tuple[int, redis_errors.ResponseError]]) -> int:
        """Record each error reply on the job whose command it answers (by command index); return
        how many of them refused a stream entry."""
        ends = list(itertools.accumulate(n for _, _, n, _, _ in batch))
        entries = 0
        for index, error in refused:
            item = bisect.bisect_right(ends, index)
            sink, commands, n, xadds, _ = batch[item]
            what = describe(commands, index - (ends[item] - n))
            sink.refused += 1
            sink.transient += may_pass(error)
            entries += 1 if xadds else 0
            if not sink.refusal:  # one line per job: its end says how many more
                sink.refusal = f"{what}: {error}"
                logger.error("job %s: Redis refused %s: %s", sink.job_id, what, error, extra={"job_id": sink.job_id})
        self.entries_lost += entries
        return entries

    def _lose(
        self, batch: list[_Item], error: BaseException, waited: float, undelivered: list[int] | None = None
    ) -> None:
        """Count ``batch`` lost on its jobs' sinks; only its ``undelivered`` commands (by index)
        if the others were written (on a cluster, the nodes that took theirs)."""
        if undelivered is not None:
            batch = _of_commands(batch, undelivered)
        for sink, _, n, _, _ in batch:
            sink.lost += n
        lost = sum([n for _, _, n, _, _ in batch])
        self.lost_total += lost
        self.entries_lost += _entries(batch)
        jobs = sorted({sink.job_id for sink, _, _, _, _ in batch})
        logger.error(
            "gave up publishing %d entries of jobs %s after %.1fs: %s",
            lost,
            ", ".join(jobs),
            waited,
            error,
        )

    @property
    def nodes_in_flight(self) -> set[str]:
        """The cluster nodes (``host:port``) with a pipeline in flight (none on one Redis)."""
        return set() if self._cluster is None else self._cluster.in_flight

    @property
    def redirects(self) -> int:
        """Commands sent again to another cluster node (``MOVED``, ``ASK``); 0 on one Redis."""
        return 0 if self._cluster is None else self._cluster.redirects

    @property
    def slot_table_reloads(self) -> int:
        """Times the cluster's slot table was reloaded (a redirect, a node lost); 0 on one Redis."""
        return 0 if self._cluster is None else self._cluster.refreshes

    def _release_waiters(self) -> None:
        while self._waiters and self._waiters[0][0] <= self._done:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)


def _single(wire: Wire | None) -> Wire:
    if wire is None:
        raise ClientStateError("the publisher has no wire")
    return wire


def _entries(batch: list[_Item]) -> int:
    """The stream entries of ``batch``'s items."""
    return sum([e for _, _, _, e, _ in batch])


def _of_commands(batch: list[_Item], indexes: list[int]) -> list[_Item]:
    """The items of ``batch`` holding the commands at ``indexes``, each counting only those
    (as commands, and as entries if the item's commands are entries)."""
    if not indexes:  # the usual case (nothing unacknowledged, nothing undelivered): no pass over the batch
        return []
    ends = list(itertools.accumulate(n for _, _, n, _, _ in batch))
    counts: dict[int, int] = {}
    for index in indexes:
        item = bisect.bisect_right(ends, index)
        counts[item] = counts.get(item, 0) + 1
    return [
        (sink, commands, counts[i], counts[i] if xadds else 0, route)
        for i, (sink, commands, _, xadds, route) in enumerate(batch)
        if i in counts
    ]
