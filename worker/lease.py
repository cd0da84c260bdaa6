"""Leases: a worker holds each job it runs by a short, renewed, fenced claim.

The claim is arq's in-progress key (``arq:in-progress:<job id>``), so arq's other workers and
clients see the job as running. Its value names the holder (a token unique to one claim), it
lives ``lease_s`` seconds, and the holder renews it every heartbeat with a compare-and-set: a
worker killed outright stops renewing, and its job runs again ``lease_s`` after the last renewal
(rather than after arq's hard timeout, which is the longest job's time).

A holder that finds a lease gone or taken — it stalled past ``lease_s`` (a long pause, a
partition) and another worker claimed the job — is **fenced**: the attempt is cancelled and
nothing more of it is written (its queued entries are dropped by the publisher). The holder
also knows when it may have lost a lease without having heard so: ``lease_s`` after the last
renewal it sent. Past that, the publisher writes nothing until a renewal confirms which leases
still hold (:meth:`Leases.confirm`), so a worker that wakes from a stall cannot write a word
for an attempt another worker has taken over.

Every change of the key is conditional on the token (Lua scripts): a fenced attempt's end
neither deletes the new holder's claim nor touches the job in arq's queue. A lease that ran out
while Redis was away (or was restarted) is taken again by its holder only if nobody claimed the
job meanwhile and no other attempt started (arq's retry counter still names this attempt), so an
outage longer than the lease does not by itself stop every running job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable

from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from tokenbus.consumer.redis_errors import REDIS_UNAVAILABLE
from tokenbus.worker.background import Background
from tokenbus.worker.publisher import Sink

logger = logging.getLogger(__name__)

# KEYS in-progress, retry counter; ARGV token, lease ms, the attempt's arq try ('' before it started).
# A lease that ran out while Redis was away is taken again if nobody else has claimed the job and no
# other attempt has started since (arq counts attempts in the retry key).
_RENEW = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not held and ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# arq's Worker.finish_job, done only while the lease is still this holder's:
# KEYS in-progress, job, retry, result, queue, abort set; ARGV token, finish, result, result ms, incr score, job id
_FINISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '1' then
  if ARGV[3] ~= '' then
    if ARGV[4] == '0' then redis.call('SET', KEYS[4], ARGV[3])
    else redis.call('SET', KEYS[4], ARGV[3], 'PX', ARGV[4]) end
  end
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('ZREM', KEYS[6], ARGV[6])
  redis.call('ZREM', KEYS[5], ARGV[6])
elseif ARGV[5] ~= '' then
  redis.call('ZINCRBY', KEYS[5], ARGV[5], ARGV[6])
end
redis.call('DEL', KEYS[1])
return 1
"""


def claim_key(job_id: str) -> str:
    return in_progress_key_prefix + job_id


@contextlib.asynccontextmanager
async def claimed(redis: Redis, job_id: str, *, ms: int) -> AsyncIterator[bool]:
    """Hold ``job_id``'s claim for a moment, as a lock no worker starts the job through (True if
    it was free); released on exit if still held."""
    token = f"lock:{uuid.uuid4().hex}".encode()
    held = bool(await redis.set(claim_key(job_id), token, nx=True, px=ms))
    try:
        yield held
    finally:
        if held:
            await redis.eval(_RELEASE, 1, claim_key(job_id), token.decode())  # type: ignore[misc]


class Leases(Background):
    """The leases of one worker: claim tokens, renewal, fencing. ``on_lost(job_id)`` is called for
    each job whose lease this worker no longer holds (the job must stop)."""

    task_name = "tokenbus-leases"

    def __init__(self, redis: Redis, *, lease_s: float, renew_every_s: float, on_lost: Callable[[str], None]) -> None:
        self._redis = redis
        self.lease_ms = max(1, int(lease_s * 1000))
        self._renew_every_s = renew_every_s
        self._on_lost = on_lost
        self.holder = uuid.uuid4().hex
        """This worker's id: every lease token it writes begins with it (its record in
        ``<prefix>:workers`` has the same id)."""
        self._claims = 0
        self.tokens: dict[str, bytes] = {}  # job id -> token of the lease held
        self.sinks: dict[str, Sink] = {}  # job id -> the running attempt's sink (fenced if the lease is lost)
        self.tries: dict[str, int] = {}  # job id -> the running attempt's arq try
        self.valid_until = float("inf")  # monotonic: past it, a lease may have lapsed unnoticed
        self.lost = 0
        """Leases found gone or taken (their attempts were stopped): read by the metrics endpoint."""
        self.renew_failures = 0
        """Renewal rounds that failed (Redis away or refusing)."""
        self._fenced_live = 0  # sinks fenced whose attempt has not ended yet
        self._renew: AsyncScript = redis.register_script(_RENEW)
        self._release: AsyncScript = redis.register_script(_RELEASE)
        self._finish: AsyncScript = redis.register_script(_FINISH)

    # -- claims ----------------------------------------------------------------------------------
    def new_token(self, job_id: str) -> bytes:
        """The token of a claim about to be made on ``job_id`` (unique to this claim)."""
        self._claims += 1
        return f"{self.holder}:{self._claims}".encode()

    def held(self, job_id: str, token: bytes, claimed_at: float) -> None:
        """``job_id`` was claimed with ``token`` (a round trip sent at monotonic ``claimed_at``)."""
        self.tokens[job_id] = token
        if self.valid_until == float("inf"):
            self.valid_until = claimed_at + self.lease_ms / 1000

    def attach(self, job_id: str, sink: Sink, job_try: int) -> None:
        """The attempt running under the lease (arq's try ``job_try``): fenced if the lease is lost."""
        self.sinks[job_id] = sink
        self.tries[job_id] = job_try

    def forget(self, job_id: str) -> None:
        self.tokens.pop(job_id, None)
        self.tries.pop(job_id, None)
        sink = self.sinks.pop(job_id, None)
        if sink is not None and sink.fenced:
            self._fenced_live -= 1
        if not self.tokens:
            self.valid_until = float("inf")

    async def release(self, job_id: str) -> None:
        """Give up the lease (a claim that was not used), if still held."""
        token = self.tokens.get(job_id)
        self.forget(job_id)
        if token is not None:
            await self._release(keys=[claim_key(job_id)], args=[token])

    async def finish(
        self, job_id: str, queue: str, *, finish: bool, result: bytes | None, result_ms: int, incr_score: int | None
    ) -> bool:
        """arq's end of a job (result, queue, retry counter), done only if the lease is still held.
        False if it was not: the job belongs to another worker now, which is left alone."""
        token = self.tokens.get(job_id)
        self.forget(job_id)
        if token is None:
            return False
        keys = [claim_key(job_id), job_key_prefix + job_id, retry_key_prefix + job_id]
        keys += [result_key_prefix + job_id, queue, abort_jobs_ss]
        args: list[bytes | str | int] = [token, int(finish), result or b"", result_ms]
        args += ["" if incr_score is None else incr_score, job_id]
        done = bool(await self._finish(keys=keys, args=args))
        if not done:
            logger.warning("job %s: its lease was lost before it ended; the job is left to its new holder", job_id)
        return done

    # -- renewal (until close(); the publisher's last batches may still confirm() after it) ---------
    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._renew_every_s)
            try:
                await self.renew()
            except REDIS_UNAVAILABLE as e:  # the leases run out on their own; confirm() tells later
                self.renew_failures += 1
                logger.warning("renewing %d job leases failed (%s); retrying", len(self.tokens), e)
            except Exception:  # Redis refused (at maxmemory, say): the same, but worth a traceback
                self.renew_failures += 1
                logger.exception("renewing %d job leases failed; retrying", len(self.tokens))

    async def renew(self) -> None:
        """Renew every lease held (one round trip); fence the jobs whose lease is gone."""
        held = list(self.tokens.items())
        if not held:
            return
        sent = time.monotonic()
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id, token in held:
                job_try = self.tries.get(job_id, "")
                keys = [claim_key(job_id), retry_key_prefix + job_id]
                await self._renew(keys=keys, args=[token, self.lease_ms, job_try], client=pipe)
            replies = await pipe.execute()
        # Only about the claims still held with the token sent: a job may have ended, or been
        # claimed again (a new token), while the round trip was under way (long, after a failover).
        answered = [(job_id, renewed) for (job_id, token), renewed in zip(held, replies, strict=True)
                    if self.tokens.get(job_id) == token]  # fmt: skip
        for job_id, renewed in answered:
            if renewed == 2:
                logger.warning("job %s: its lease ran out while Redis was away; nobody took it over: going on", job_id)
        self._fence(job_id for job_id, renewed in answered if not renewed)
        if self.tokens:
            self.valid_until = sent + self.lease_ms / 1000

    def fenced(self) -> int:
        """How many running attempts are fenced (their entries are to be dropped)."""
        return self._fenced_live

    def expired(self) -> bool:
        """True if a lease may have lapsed without this worker hearing of it."""
        return time.monotonic() >= self.valid_until

    async def confirm(self) -> None:
        """Renew now: after it, every job whose lease is gone is fenced. Raises what redis-py
        raises while Redis is away (the publisher retries, and gives up, as for any write)."""
        await self.renew()

    def _fence(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            sink = self.sinks.get(job_id)
            if sink is not None and not sink.fenced:
                sink.fenced = True
                self._fenced_live += 1
            self.tokens.pop(job_id, None)
            self.lost += 1
            logger.error(
                "job %s: this worker lost its lease (another may run it now); stopping the attempt", job_id,
                extra={"job_id": job_id},
            )  # fmt: skip
            self._on_lost(job_id)
        if not self.tokens:
            self.valid_until = float("inf")
