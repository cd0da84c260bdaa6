"""Leases on running jobs (worker/lease.py) and the envelope check (worker/serializer.py), piece by
piece against a real redis-server: a lease taken over fences its attempt, a lease that may have
lapsed unnoticed holds every write until confirmed, and arq's end of a job is done only by the
lease's holder."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import orjson
import pytest
from arq.constants import job_key_prefix, retry_key_prefix
from redis.asyncio import Redis

from tests.support import read_stream
from tokenbus.schemas.entries import EntryType
from tokenbus.schemas.keys import StreamKeys
from tokenbus.worker.emitter import StreamLimits
from tokenbus.worker.lease import Leases, claim_key
from tokenbus.worker.orphans import close_attempt
from tokenbus.worker.publisher import Publisher, Sink
from tokenbus.worker.serializer import InvalidEnvelope, job_deserializer

GOOD = {"t": 1, "f": "run_graph", "a": [{"graph": "joke_poem"}], "k": {}, "et": 1}


@pytest.mark.parametrize(
    "change",
    [{"t": "5"}, {"t": True}, {"et": "yesterday"}, {"et": None}, {"f": [1]}, {"a": {}}, {"a": "x"}, {"k": []}],
)
def test_an_envelope_with_a_part_arq_cannot_use_is_refused_naming_it(change: dict[str, object]) -> None:
    (name,) = change
    with pytest.raises(InvalidEnvelope, match=f"'{name}' is"):
        job_deserializer(orjson.dumps(GOOD | change))


@pytest.mark.parametrize("missing", ["t", "f", "a", "k", "et"])
def test_an_envelope_missing_a_part_is_refused(missing: str) -> None:
    with pytest.raises(InvalidEnvelope, match=f"has no '{missing}'"):
        job_deserializer(orjson.dumps({k: v for k, v in GOOD.items() if k != missing}))


def test_results_and_good_envelopes_pass_and_pickle_is_refused() -> None:
    assert job_deserializer(orjson.dumps(GOOD)) == GOOD
    result = {**GOOD, "s": False, "r": "boom", "st": 1, "ft": 2, "q": "q", "id": "j"}
    assert job_deserializer(orjson.dumps(result)) == result
    with pytest.raises(InvalidEnvelope, match="never pickle"):
        job_deserializer(b"\x80\x04\x95")


@pytest.fixture
async def publisher(redis: Redis) -> AsyncIterator[Publisher]:
    publisher = Publisher(redis).start()
    yield publisher
    await publisher.close()


def make_leases(redis: Redis, lost: list[str], *, lease_s: float = 30.0) -> Leases:
    return Leases(redis, lease_s=lease_s, renew_every_s=3600, on_lost=lost.append)


async def claim(redis: Redis, leases: Leases, job_id: str) -> bytes:
    token = leases.new_token(job_id)
    sent = time.monotonic()
    assert await redis.set(claim_key(job_id), token, nx=True, px=leases.lease_ms)
    leases.held(job_id, token, sent)
    return token


async def two_jobs_one_taken_over(
    redis: Redis, publisher: Publisher
) -> tuple[Leases, list[str], tuple[str, str], dict[str, Sink]]:
    """A worker's leases on two running jobs, one of them since claimed by another worker (this
    one stalled); its publisher fenced by them. Returns the leases, the jobs reported lost, the two
    job ids (kept, taken over) and their sinks."""
    lost: list[str] = []
    leases = make_leases(redis, lost)
    publisher.fence = leases
    kept, taken = f"j{uuid.uuid4().hex}", f"j{uuid.uuid4().hex}"
    sinks = {}
    for job_id in (kept, taken):
        await claim(redis, leases, job_id)
        sinks[job_id] = publisher.sink(job_id)
        leases.attach(job_id, sinks[job_id], 1)
    await redis.set(claim_key(taken), b"another worker", px=30_000)
    return leases, lost, (kept, taken), sinks


async def test_a_lease_taken_over_fences_its_attempt(redis: Redis, publisher: Publisher) -> None:
    leases, lost, (mine, theirs), sinks = await two_jobs_one_taken_over(redis, publisher)
    stream = f"s{uuid.uuid4().hex}"

    await leases.renew()
    assert lost == [theirs] and sinks[theirs].fenced and not sinks[mine].fenced
    assert await redis.pttl(claim_key(mine)) > 20_000  # renewed
    for job_id, sink in sinks.items():
        publisher.xadd(sink, [(stream, 1000)], [b"job", job_id])
        await sink.flushed()
    assert [fields[b"job"].decode() for _, fields in await redis.xrange(stream)] == [mine]
    assert await redis.get(claim_key(theirs)) == b"another worker"


async def test_after_a_stall_nothing_is_written_until_the_leases_are_confirmed(
    redis: Redis, publisher: Publisher
) -> None:
    leases, lost, (kept, taken), sinks = await two_jobs_one_taken_over(redis, publisher)
    stream = f"s{uuid.uuid4().hex}"
    leases.valid_until = time.monotonic() - 1  # a stall past the lease: no renewal has been heard of since

    for job_id, sink in sinks.items():  # queued before anyone renewed: the writer must confirm first
        publisher.xadd(sink, [(stream, 1000)], [b"job", job_id])
    await asyncio.gather(*(sink.flushed() for sink in sinks.values()))
    assert lost == [taken] and not leases.expired()
    assert [fields[b"job"].decode() for _, fields in await redis.xrange(stream)] == [kept]


async def test_only_the_holder_of_a_lease_ends_the_job_in_arq(redis: Redis) -> None:
    lost: list[str] = []
    leases = make_leases(redis, lost)
    queue, job_id = f"q{uuid.uuid4().hex}", f"j{uuid.uuid4().hex}"
    await redis.zadd(queue, {job_id: 1})
    await redis.set(job_key_prefix + job_id, b"{}")
    await claim(redis, leases, job_id)
    await redis.set(claim_key(job_id), b"another worker", px=30_000)

    assert not await leases.finish(job_id, queue, finish=True, result=b"{}", result_ms=1000, incr_score=None)
    assert await redis.zscore(queue, job_id) == 1 and await redis.exists(job_key_prefix + job_id)
    assert await redis.get(claim_key(job_id)) == b"another worker"

    await redis.delete(claim_key(job_id))
    await claim(redis, leases, job_id)
    await redis.set(retry_key_prefix + job_id, b"1")
    assert await leases.finish(job_id, queue, finish=True, result=b"{}", result_ms=1000, incr_score=None)
    assert await redis.zscore(queue, job_id) is None
    assert await redis.exists(job_key_prefix + job_id, retry_key_prefix + job_id, claim_key(job_id)) == 0


async def test_a_job_closed_for_good_after_a_retry_entry_gets_the_next_attempts_final_entry(redis: Redis) -> None:
    keys, limits, job_id = StreamKeys(f"t{uuid.uuid4().hex[:10]}"), StreamLimits(), f"j{uuid.uuid4().hex}"
    start = {"v": "1", "type": "start", "job": job_id, "attempt": "1", "seq": "0", "ts": "1"}
    await redis.xadd(keys.job(job_id), start)  # type: ignore[arg-type]
    assert await close_attempt(redis, keys, limits, job_id, retry=True, reason="attempt {attempt} interrupted")
    assert await close_attempt(redis, keys, limits, job_id, retry=True, reason="again") is None  # closed
    final = await close_attempt(redis, keys, limits, job_id, retry=False, reason="max tries reached")
    assert final is not None and (final.attempt, final.seq, final.retry) == (2, 0, False)
    assert await close_attempt(redis, keys, limits, job_id, retry=False, reason="twice") is None
    entries = await read_stream(redis, keys.job(job_id))
    assert [(e.type, e.attempt, e.retry) for e in entries] == [
        (EntryType.START, 1, False),
        (EntryType.ERROR, 1, True),
        (EntryType.ERROR, 2, False),
    ]


async def test_a_lease_that_ran_out_while_redis_was_away_is_taken_again_if_nobody_else_started(redis: Redis) -> None:
    lost: list[str] = []
    leases = make_leases(redis, lost)
    alone, overtaken = f"j{uuid.uuid4().hex}", f"j{uuid.uuid4().hex}"
    for job_id in (alone, overtaken):
        await claim(redis, leases, job_id)
        leases.attach(job_id, Publisher(redis).sink(job_id), 1)
        await redis.set(retry_key_prefix + job_id, b"1")  # arq's count of attempts started
    await redis.delete(claim_key(alone), claim_key(overtaken))  # both ran out during an outage
    await redis.set(retry_key_prefix + overtaken, b"2")  # and another worker started attempt 2 of one

    await leases.renew()
    assert lost == [overtaken]
    assert await redis.get(claim_key(alone)) == leases.tokens[alone]
    assert await redis.exists(claim_key(overtaken)) == 0


async def test_a_renewal_answered_after_its_job_ended_or_was_claimed_again_fences_nothing(redis: Redis) -> None:
    """A renewal is one round trip; a job may end (its claim deleted by arq's end of it) or be
    claimed again by this worker (a new attempt, a new token) while it is on its way, a long way
    after a failover of the queue's Redis. Its answer is about the tokens it sent: neither job
    was lost, and the new attempt must not be stopped."""
    lost: list[str] = []
    leases = make_leases(redis, lost)
    ended, again = f"j{uuid.uuid4().hex}", f"j{uuid.uuid4().hex}"
    for job_id in (ended, again):
        await claim(redis, leases, job_id)
        leases.attach(job_id, Publisher(redis).sink(job_id), 1)

    # the claims go first (the renewal is slow to get there: waiting for a connection, say)
    await redis.delete(claim_key(ended), claim_key(again))
    renewing = asyncio.create_task(leases.renew())
    await asyncio.sleep(0)  # the renewal has taken the tokens it sends, and waits for its answer
    leases.forget(ended)  # the job ended (Leases.finish)
    leases.forget(again)
    await claim(redis, leases, again)  # the same job claimed again: its next attempt
    await renewing
    assert lost == [] and leases.lost == 0
    assert set(leases.tokens) == {again}
