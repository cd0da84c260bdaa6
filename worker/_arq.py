"""Everything tokenbus takes from arq's private parts, in one place: its worker, subclassed.

Written for arq 0.28 (checked at import; arq is in maintenance mode). :class:`TokenbusWorker`
overrides arq's ``_poll_iteration`` (a poll that survives any error, and waits for wake-ups),
``start_jobs`` (every claim of a poll in one round trip, as a lease), ``run_job``, ``finish_job``
and ``finish_failed_job`` (bad jobs closed, the end of a job done under its lease), and ``close``
(bounded), and uses ``_release_sem_dec_counter_on_complete`` and ``_handle_signals``.
:func:`tolerate_missing_info` replaces arq's ``log_redis_info`` for the embedded fakeredis, and
:func:`redact_job_arguments` arq's ``args_to_string`` (a job's arguments are users' prompts).

The public API that would replace it: none in arq 0.28; a queue of tokenbus's own (or arq 0.29+
hooks, should they come) would.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import logging
import signal
import time
from typing import Any

import orjson
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker
from redis import exceptions as redis_errors

from tokenbus.consumer.redis_errors import REDIS_UNAVAILABLE
from tokenbus.schemas.entries import Entry, EntryType, ErrorType
from tokenbus.schemas.errors import ClientStateError, InvalidJobId, shown
from tokenbus.schemas.job import is_valid_graph_name
from tokenbus.schemas.keys import is_valid_job_id, validate_job_id, wake_channel
from tokenbus.worker.background import stop
from tokenbus.worker.job import RESOURCES
from tokenbus.worker.lease import Leases
from tokenbus.worker.log_context import bind_job
from tokenbus.worker.orphans import WORKER_LOST, close_attempt, newest_entry
from tokenbus.worker.resources import WorkerResources
from tokenbus.worker.wakeups import Wakeups

PRIVATE_NAMES = (
    "_poll_iteration", "_release_sem_dec_counter_on_complete", "_handle_signals", "log_redis_info", "args_to_string",
)  # fmt: skip
"""What this module uses of the library's private parts: no other module of tokenbus may (tests/test_layers.py)."""
WRITTEN_FOR = ("0.28",)
"""The arq minor versions this module was written and tested against."""

_version = importlib.metadata.version("arq")
if ".".join(_version.split(".")[:2]) not in WRITTEN_FOR:
    raise ImportError(f"tokenbus's worker subclasses arq 0.28's worker, and arq {_version} is installed")

logger = logging.getLogger(__name__)

POLL_RETRY_DELAY_S = 0.5
_REDIS_FAILED = (*REDIS_UNAVAILABLE, redis_errors.WatchError)  # or a WATCHed key changed under arq
_REDIS_REFUSING = (
    *_REDIS_FAILED,
    redis_errors.OutOfMemoryError,
    redis_errors.ReadOnlyError,
    redis_errors.ExecAbortError,
)
"""Redis refused for now (at ``maxmemory``, a replica, a transaction refused for either): the job
is fine and stays queued."""


class TokenbusWorker(Worker):
    """arq's worker, kept alive through Redis restarts and bad jobs, woken by enqueuers, claiming
    each poll's jobs at once, and holding each job by a lease (:mod:`tokenbus.worker.lease`).

    arq 0.28 lets any exception in its poll loop end the worker (a connection error, or a job
    envelope it cannot read); here it is logged and the poll retried, and a job that cannot be
    run is closed and taken off the queue. Between polls the worker waits up to
    ``poll_delay_s`` for a wake-up (a job announced, or a job slot freed while the worker was
    full; see :mod:`tokenbus.worker.wakeups`); arq's own poll delay is 0. A failed claim gives its job
    slots back (arq's leaked them).
    """

    def __init__(self, *args: Any, poll_delay_s: float, shutdown_margin_s: float, **kwargs: Any) -> None:
        redact_job_arguments()
        super().__init__(*args, poll_delay=0, **kwargs)
        self.idle_poll_s = poll_delay_s
        self.shutdown_margin_s = shutdown_margin_s
        self._wakeups: Wakeups | None = None
        self.leases: Leases | None = None
        # read by the metrics endpoint (worker/metrics.py), with arq's own jobs_complete/failed/retried
        self.jobs_unrunnable = 0
        """Jobs closed without running because their envelope or id could not be used."""
        self.jobs_not_run = 0
        """Jobs arq failed without running them (aborted before they started, max tries, expired)."""
        self.poll_failures = 0
        """Polls of the queue that failed (Redis away or refusing, or a bug)."""
        self.job_redis_failures = 0
        """Jobs left queued because Redis failed around their run (their claim or their end)."""

    async def main(self) -> None:
        try:
            await super().main()
        finally:
            if self._wakeups is not None:
                await self._wakeups.close()

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except _REDIS_REFUSING as e:
            self.poll_failures += 1
            logger.warning("polling queue %s failed (%s); retrying", self.queue_name, e)
            await asyncio.sleep(POLL_RETRY_DELAY_S)
            return
        except Exception:  # a bug, or a job that slipped past the checks: never the end of the worker
            self.poll_failures += 1
            logger.exception("polling queue %s failed unexpectedly; retrying", self.queue_name)
            await asyncio.sleep(POLL_RETRY_DELAY_S)
            return
        if self.idle_poll_s > 0:
            if self._wakeups is None:
                self._wakeups = Wakeups(self.pool, wake_channel(self.queue_name), retry_s=POLL_RETRY_DELAY_S).start()
            await self._wakeups.wait(self.idle_poll_s)

    def _job_done(self) -> None:
        full = self.job_counter >= self.max_jobs
        self._release_sem_dec_counter_on_complete()
        if full and self._wakeups is not None:
            self._wakeups.set()  # jobs may be waiting for the slot

    def job_lost(self, job_id: str) -> None:
        """The lease on ``job_id`` is gone (this worker stalled past it): stop the attempt."""
        task = self.job_tasks.get(job_id)
        if task is not None:
            task.cancel()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Claim the jobs of one poll in one round trip, then start them.

        arq claims jobs one after another, four round trips each (WATCH, EXISTS, ZSCORE,
        MULTI/EXEC); on a worker busy streaming, each waits its turn in the event loop, and the
        last job of a poll starts long after the first (BENCHMARKS.md).
        Here each claim is ``SET <in-progress key> <token> NX PX <lease>`` (arq's key, so arq's
        other workers see it; a lease, see :mod:`tokenbus.worker.lease`) and the job's queue score, all
        pipelined, for as many jobs as there are free slots. A job claimed but no longer due
        (removed from the queue, or re-queued for later) has its claim dropped, as arq would never
        have set it. Jobs beyond the free slots wait.

        arq keeps a running job in the queue until it ends, so a poll lists the jobs running here
        and elsewhere before the new ones. Those running here are skipped. If a claim fails
        (most likely a job running elsewhere) while more jobs are listed, one ``EXISTS`` round
        trip leaves out those claimed elsewhere and the freed slots go to the jobs behind them.
        """
        candidates = []
        for raw_id in job_ids:
            try:
                job_id = raw_id.decode()
            except UnicodeDecodeError:
                await self._drop_undecodable(raw_id)
                continue
            if (task := self.tasks.get(job_id)) is None or task.done():
                candidates.append(job_id)
        looked_ahead = False
        while claims := await self._take_slots(candidates):
            if await self._claim(claims) or looked_ahead or not candidates:
                return
            looked_ahead = True
            async with self.pool.pipeline(transaction=False) as pipe:
                for job_id in candidates:
                    pipe.exists(in_progress_key_prefix + job_id)
                taken = await pipe.execute()
            candidates = [job_id for job_id, elsewhere in zip(candidates, taken, strict=True) if not elsewhere]

    async def _take_slots(self, candidates: list[str]) -> list[str]:
        """A job slot for each of the first ``candidates``, as many as are free; those are removed
        from ``candidates`` and returned."""
        claims: list[str] = []
        for job_id in candidates:
            if claims and self.sem.locked():
                break
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                break
            self.job_counter += 1
            claims.append(job_id)
        del candidates[: len(claims)]
        return claims

    async def _claim(self, claims: list[str]) -> bool:
        """Claim and start ``claims`` (their slots taken); give back the slots of those that could
        not be claimed. True if every one started."""
        leases = self._leases()
        tokens = [leases.new_token(job_id) for job_id in claims]
        sent = time.monotonic()
        try:
            async with self.pool.pipeline(transaction=False) as pipe:
                for job_id, token in zip(claims, tokens, strict=True):
                    pipe.set(in_progress_key_prefix + job_id, token, px=leases.lease_ms, nx=True)
                    pipe.zscore(self.queue_name, job_id)
                replies = await pipe.execute()
        except BaseException:
            for _ in claims:  # the slots taken for jobs that could not be claimed
                self._release_sem_dec_counter_on_complete()
            raise
        now, not_due, started = timestamp_ms(), [], 0
        for job_id, token, claimed, score in zip(claims, tokens, replies[::2], replies[1::2], strict=True):
            if claimed:
                leases.held(job_id, token, sent)
            if not claimed or not score or score > now:  # running elsewhere, done, or not due yet
                self._release_sem_dec_counter_on_complete()
                if claimed:
                    not_due.append(job_id)
                continue
            task = self.loop.create_task(self.run_job(job_id, int(score)))
            task.add_done_callback(lambda _: self._job_done())
            self.tasks[job_id] = task
            started += 1
        for job_id in not_due:
            await leases.release(job_id)
        return started == len(claims)

    def _leases(self) -> Leases:
        if self.leases is None:
            raise ClientStateError("the worker's leases are made at startup")
        return self.leases

    @property
    def wakeups(self) -> Wakeups | None:
        """The wake-up listener, once the first poll has started it."""
        return self._wakeups

    async def run_job(self, job_id: str, score: int) -> None:
        """arq's run of one job; a job that cannot be run (an id or envelope arq fails on) is
        closed and taken off the queue instead of ending the worker."""
        bind_job(job_id=job_id if is_valid_job_id(job_id) else shown(job_id))  # this task's lines (arq's too) name it
        try:
            validate_job_id(job_id)
        except InvalidJobId as e:
            await self._close_unrunnable(job_id, str(e))
            return
        try:
            await super().run_job(job_id, score)
        except _REDIS_REFUSING as e:
            self.job_redis_failures += 1
            logger.warning("job %s: Redis failed around its run (%s); it stays queued", job_id, e)
            with contextlib.suppress(*_REDIS_REFUSING):
                await self._leases().release(job_id)
        except Exception as e:
            logger.exception("job %s could not be run", job_id)
            await self._close_unrunnable(job_id, f"{type(e).__name__}: {e}")

    async def _close_unrunnable(self, job_id: str, reason: str) -> None:
        """Take a job that cannot be run off the queue, and end its stream (if its id allows one)."""
        self.jobs_unrunnable += 1
        self.jobs_failed += 1
        logger.error("job %s: closed without running: %s", shown(job_id), reason)
        try:
            async with self.pool.pipeline(transaction=False) as pipe:  # no MULTI: Redis at maxmemory takes these
                pipe.delete(job_key_prefix + job_id, retry_key_prefix + job_id)
                pipe.zrem(self.queue_name, job_id)
                pipe.zrem(abort_jobs_ss, job_id)
                await pipe.execute()
            await self._leases().release(job_id)
            if is_valid_job_id(job_id):
                await self._close_stream(job_id, f"the job could not be run: {reason}", ErrorType.INVALID_JOB)
        except _REDIS_FAILED:
            logger.warning("job %s: could not close it; it stays queued", shown(job_id), exc_info=True)

    async def _drop_undecodable(self, raw_id: bytes) -> None:
        """A queued id that is not UTF-8 cannot name a stream or a task: drop it from the queue."""
        self.jobs_unrunnable += 1
        logger.error("queue %s: dropped job id %r (not UTF-8)", self.queue_name, raw_id[:80])
        async with self.pool.pipeline(transaction=False) as pipe:
            pipe.zrem(self.queue_name, raw_id)
            pipe.delete(job_key_prefix.encode() + raw_id)
            await pipe.execute()

    async def _close_stream(
        self, job_id: str, reason: str, error_type: str, *, kind: EntryType = EntryType.ERROR
    ) -> None:
        """The final entry of a job arq will not run (again)."""
        resources: WorkerResources | None = self.ctx.get(RESOURCES)
        if resources is None:
            return
        await close_attempt(
            resources.redis, resources.keys, resources.limits, job_id, retry=False, reason=reason,
            kind=kind, error_type=error_type, unstarted=True,
        )  # fmt: skip

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        """arq's end of a job, under the job's lease. A job whose final terminal entry is written
        is finished, whatever arq decided: a cancellation that lands as the job ends (a shutdown's
        grace running out) would otherwise re-queue a job that has ended."""
        resources: WorkerResources | None = self.ctx.get(RESOURCES)
        if resources is not None and job_id in resources.ended:
            resources.ended.discard(job_id)
            if not finish:
                logger.info("job %s ended before its cancellation landed: not running it again", job_id)
                finish, incr_score = True, None
        result_ms = 0 if keep_result_forever or result_timeout_s is None else round(result_timeout_s * 1000)
        await self._leases().finish(
            job_id, self.queue_name, finish=finish, result=result_data, result_ms=result_ms, incr_score=incr_score
        )

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        """arq fails a job here without running it (aborted before it started, max tries reached,
        expired, an envelope it cannot read): give the job's followers its terminal entry now,
        rather than never."""
        await super().finish_failed_job(job_id, result_data)
        self.jobs_not_run += 1
        self._leases().forget(job_id)
        resources: WorkerResources | None = self.ctx.get(RESOURCES)
        if resources is None or not is_valid_job_id(job_id):
            return
        reason = "arq did not run the job"
        with contextlib.suppress(Exception):
            reason = str(orjson.loads(result_data or b"{}").get("r") or reason)
        aborted = reason.startswith("CancelledError")
        try:
            last = await newest_entry(resources.redis, resources.keys, job_id)
            error_type = ErrorType.CANCELLED if aborted else ErrorType.JOB_NOT_RUN
            kind = EntryType.CANCELLED if aborted else EntryType.ERROR
            await self._close_stream(job_id, _not_run_reason(aborted, last, reason), error_type, kind=kind)
        except _REDIS_FAILED:
            logger.warning("job %s: could not write its terminal entry; the sweeper will", job_id, exc_info=True)

    async def close(self) -> None:
        """arq's close, bounded and quiet: jobs still running ``shutdown_margin_s`` after they were
        cancelled (a terminal entry that Redis does not take) are stopped, and a job task that
        ended cancelled does not make the close raise (arq gathers them, and a cancelled one
        raised ``CancelledError`` out of the worker: exit status 1 and a traceback)."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)  # as arq's close does first: cancel the running jobs now
        running = [t for t in self.tasks.values() if not t.done()]
        if running:
            _, late = await asyncio.wait(running, timeout=self.shutdown_margin_s)
            if late:
                margin = self.shutdown_margin_s
                logger.error("%d jobs did not stop within %.0fs of shutdown; stopping them", len(late), margin)
                await asyncio.gather(*(stop(task) for task in late))
        self.tasks = {}  # all ended
        await super().close()


def _not_run_reason(aborted: bool, last: Entry | None, arq_reason: str) -> str:
    """Why arq failed a job without running it, from what the job stream says happened before."""
    started = last is not None and not last.is_terminal  # an attempt ran, and its worker stopped
    if aborted:
        return "the job was aborted while waiting to run again" if started else "the job was aborted before it started"
    if started:
        return WORKER_LOST.format(attempt="{attempt}", why=arq_reason)
    return f"the job was not run ({arq_reason})"


@functools.cache
def tolerate_missing_info() -> None:
    """arq logs the server's INFO when a worker starts; fakeredis has no INFO command (and its TCP
    server drops the connection on an unknown command). Only the embedded fallback needs this:
    the worker's start-up log line changes, nothing else."""
    import arq.worker

    async def log_redis_info(redis: Any, log_func: Any) -> None:
        log_func(f"redis: embedded fakeredis, db_keys={await redis.dbsize()}")

    arq.worker.log_redis_info = log_redis_info  # type: ignore[attr-defined]


@functools.cache
def redact_job_arguments() -> None:
    """arq logs the first 80 characters of each job's arguments as the job starts: a tokenbus job's
    argument is its request, whose input holds what users wrote (their prompts), and logs must not.
    arq 0.28 has no option for it (``log_results`` is about results), so its formatter is replaced
    with one that names the graph only."""
    import arq.worker

    if not callable(getattr(arq.worker, "args_to_string", None)):
        raise ImportError("arq.worker.args_to_string is gone: job arguments would be logged unredacted")
    arq.worker.args_to_string = _redacted_arguments  # type: ignore[attr-defined]


def _redacted_arguments(args: Any, kwargs: Any) -> str:
    """What a job's start line shows of its arguments: the graph a request names, nothing else."""
    request = args[0] if len(args) == 1 and not kwargs else None
    graph = request.get("graph") if isinstance(request, dict) else None
    if isinstance(graph, str) and is_valid_graph_name(graph):
        return f"graph={graph}, input redacted"
    return f"{len(args)} arguments and {len(kwargs)} keyword arguments, redacted"
