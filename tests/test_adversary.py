"""The adversary's fault suite, against real worker processes, a real redis-server and the offline
model over real HTTP: poison arq envelopes, rolling restarts, SIGKILL and SIGSTOP with the default
or a short lease, a job id re-used, Redis out of memory.

Kill points are random; the seed is printed and can be fixed with TOKENBUS_FAULT_SEED.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import random
import signal
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, TypedDict

import orjson
import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.utils import timestamp_ms
from langgraph.graph import START, StateGraph
from langgraph.types import StreamWriter
from redis.asyncio import Redis

import tokenbus.worker.job
from tests.conftest import make_settings
from tests.support import (
    JOKE,
    POEM,
    Process,
    ThreadedModelServer,
    follow_job,
    read_stream,
    spread,
    start_worker,
    wait_for,
    wait_until,
)
from tokenbus.consumer._redis_cluster import AnyRedis
from tokenbus.consumer.jobs import JobView, job_result
from tokenbus.consumer.reader import stop_task
from tokenbus.redis_server import RedisClusterProcesses, RedisServerProcess
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.schemas.job import JOB_FUNCTION, StreamMode
from tokenbus.schemas.keys import StreamKeys, wake_channel
from tokenbus.worker.app import build_worker
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.redis_client import streams_from_settings
from tokenbus.worker.settings import Settings

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

REQUEST = {"graph": "joke_poem", "input": {"topic": "cats"}, "modes": ["custom"]}
MAX_ERROR_CHARS = 500


@pytest.fixture(scope="module")
def rng() -> random.Random:
    seed = int(os.environ.get("TOKENBUS_FAULT_SEED") or random.SystemRandom().randrange(1 << 30))
    print(f"fault seed: TOKENBUS_FAULT_SEED={seed}")
    return random.Random(seed)


@pytest.fixture(scope="module")
def slow_model() -> Iterator[ThreadedModelServer]:
    """The offline model at 40 tokens/s: about 2.3 s per joke_poem job, long enough to span a restart."""
    server = ThreadedModelServer(tokens_per_s=40).start()
    yield server
    server.stop()


async def start_workers(settings: Settings, count: int, *, name: str = "worker") -> list[Process]:
    """``count`` ``tokenbus worker`` processes, started side by side, each serving."""

    return list(await asyncio.gather(*(start_worker(settings, name=f"{name}-{i}") for i in range(count))))


async def stop_all(workers: list[Process]) -> None:
    await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)


def assert_alive(workers: list[Process]) -> None:
    for worker in workers:
        assert worker.proc.returncode is None, f"{worker.name} exited ({worker.proc.returncode}):\n{worker.output}"


def stream_id(entry: Entry) -> tuple[int, int]:
    assert entry.id is not None
    ms, _, seq = entry.id.partition("-")
    return int(ms), int(seq)


def finals(stream: list[Entry]) -> list[Entry]:
    return [e for e in stream if e.is_final]


def newest_attempt(stream: list[Entry]) -> list[Entry]:
    newest = max(e.attempt for e in stream)
    return [e for e in stream if e.attempt == newest]


async def raw_enqueue(redis: Redis, queue: str, job_id: bytes, envelope: bytes | None) -> None:
    """Enqueue as a client in another language would: the arq job key, then the queue entry."""
    async with redis.pipeline(transaction=False) as pipe:
        if envelope is not None:
            pipe.set(job_key_prefix.encode() + job_id, envelope)
        pipe.zadd(queue, {job_id: timestamp_ms()})
        pipe.publish(wake_channel(queue), b"")
        await pipe.execute()


async def view_within(
    redis: AnyRedis, prefix: str, job_id: str, within: float, workers: Sequence[Process] = ()
) -> JobView:
    """The job's result once it has ended (a follower), or fail after ``within`` seconds (showing
    what ``workers`` printed)."""
    try:
        async with asyncio.timeout(within):
            return await job_result(redis, job_id, prefix=prefix, wait=True)
    except TimeoutError:
        output = "\n".join(f"=== {w.name}\n{w.output}" for w in workers)
        raise AssertionError(f"the follower of job {job_id} did not return within {within}s\n{output}") from None


# -- 1. poison envelopes ----------------------------------------------------------------------------

_MISSING = object()
HUGE_GRAPH = "g" * (10 << 20)


def _envelope(**fields: Any) -> bytes:
    envelope: dict[str, Any] = {"t": 1, "f": JOB_FUNCTION, "a": [REQUEST], "k": {}, "et": timestamp_ms()}
    envelope.update(fields)
    return orjson.dumps({k: v for k, v in envelope.items() if v is not _MISSING})


def poison_corpus(prefix: str) -> tuple[dict[str, bytes | None], dict[bytes, bytes]]:
    """Malformed arq envelopes under valid job ids (``None``: the arq job key is missing, as if it
    expired), and well-formed envelopes under ids outside the job-id alphabet."""
    envelopes: dict[str, bytes | None] = {
        "t-string": _envelope(t="5"),
        "t-huge": _envelope(t=10**12),
        "et-word": _envelope(et="yesterday"),
        "et-missing": _envelope(et=_MISSING),
        "f-missing": _envelope(f=_MISSING),
        "f-unknown": _envelope(f="no_such_function"),
        "f-number": _envelope(f=42),
        "a-empty": _envelope(a=[]),
        "a-two-args": _envelope(a=[REQUEST, REQUEST]),
        "a-object": _envelope(a=REQUEST),
        "a-string": _envelope(a="joke_poem"),
        "k-extra": _envelope(k={"extra": 1}),
        "k-list": _envelope(k=["extra"]),
        "arg-list": _envelope(a=[[1, 2]]),
        "arg-number": _envelope(a=[42]),
        "arg-huge-graph": _envelope(a=[{"graph": HUGE_GRAPH, "input": {}}]),
        "arg-bad-field": _envelope(a=[{**REQUEST, "modes": ["debug"]}]),
        "not-json": b"\x80\x81 not json {",
        "json-list": b'[1, "run_graph", [], {}]',
        "json-string": b'"run_graph"',
        "empty": b"",
        "pickle": pickle.dumps({"t": 1, "f": JOB_FUNCTION, "a": [REQUEST], "k": {}, "et": 0}),
        "expired": None,
    }
    valid = {f"{prefix}-{name}": envelope for name, envelope in envelopes.items()}
    invalid = {
        f"{prefix} with space".encode(): _envelope(),
        f"{{{prefix}}}".encode(): _envelope(),
        prefix.encode() + b"x" * 10_000: _envelope(),
        prefix.encode() + b"-\xff\xfe-not-utf8": _envelope(),
    }
    return valid, invalid


async def test_poison_envelopes_fail_their_own_job_only(
    settings: Settings, client: TokenbusClient, redis: Redis
) -> None:
    workers = await start_workers(settings, 2)
    valid, invalid = poison_corpus(settings.prefix)
    queue = settings.queue_name
    try:
        for job_id, envelope in valid.items():
            await raw_enqueue(redis, queue, job_id.encode(), envelope)
        for raw_id, envelope in invalid.items():
            await raw_enqueue(redis, queue, raw_id, envelope)
        arq_style = f"{settings.prefix}-t-null"  # arq's own enqueue_job writes "t": null: not poison
        await raw_enqueue(redis, queue, arq_style.encode(), _envelope(t=None))
        good = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"])

        async def settled(job_id: str) -> bool:
            ended = any(e.is_final for e in await read_stream(redis, settings.keys.job(job_id)))
            return ended and await redis.zscore(queue, job_id) is None

        async def all_settled() -> bool:
            assert_alive(workers)
            done = await asyncio.gather(*(settled(job_id) for job_id in valid))
            return all(done) and not any([await redis.zscore(queue, raw) for raw in invalid])

        try:
            await wait_for(all_settled, within=60, what="every poison job to end")
        except AssertionError:
            assert_alive(workers)
            left = [job_id.removeprefix(f"{settings.prefix}-") for job_id in valid if not await settled(job_id)]
            left += [f"invalid id {raw[:40]!r}" for raw in invalid if await redis.zscore(queue, raw) is not None]
            raise AssertionError(f"poison jobs not ended and removed from the queue: {left}") from None

        for job_id in (good, arq_style):
            view = await view_within(redis, settings.prefix, job_id, 30, workers)
            assert (view.status, view.text) == (EntryType.END, JOKE + POEM), f"good job {job_id} failed: {view}"
        assert_alive(workers)

        problems = []
        for job_id in valid:
            name = job_id.removeprefix(f"{settings.prefix}-")
            stream = await read_stream(redis, settings.keys.job(job_id))
            ends = finals(stream)
            if len(ends) != 1 or ends[0].type is not EntryType.ERROR or stream[-1] is not ends[-1]:
                problems.append(f"{name}: final entries {[(e.type.value, e.error[:80]) for e in ends]}")
                continue
            error = ends[0].error
            if not error or "\n" in error or len(error) > MAX_ERROR_CHARS:
                problems.append(f"{name}: error is not one short line ({len(error)} chars): {error[:200]!r}")
            for start in (e for e in stream if e.type is EntryType.START):
                graph = (start.data or {}).get("graph") if isinstance(start.data, dict) else None
                if graph is not None and len(str(graph)) > 128:
                    problems.append(f"{name}: start entry carries a graph name of {len(str(graph))} chars")
            keys = [job_key_prefix + job_id, in_progress_key_prefix + job_id]
            if await redis.exists(*keys):
                problems.append(f"{name}: arq keys left: {[k for k in keys if await redis.exists(k)]}")
        for raw_id in invalid:
            stream_key = settings.prefix.encode() + b":job:{" + raw_id + b"}"
            if await redis.exists(stream_key):
                problems.append(f"invalid id {raw_id[:40]!r}: a job stream was written")
            if await redis.exists(job_key_prefix.encode() + raw_id, in_progress_key_prefix.encode() + raw_id):
                problems.append(f"invalid id {raw_id[:40]!r}: arq keys left")
        assert not problems, "\n".join(problems)
    finally:
        await stop_all(workers)


# -- 2. rolling restart -----------------------------------------------------------------------------

GRACE_S = 1
EXIT_MARGIN_S = 15


async def sigterm_and_wait(worker: Process, grace_s: float) -> None:
    """SIGTERM ``worker`` and fail (printing its output) unless it exits within grace + margin."""
    worker.proc.send_signal(signal.SIGTERM)
    try:
        code = await worker.wait(within=grace_s + EXIT_MARGIN_S)
    except TimeoutError:
        output = worker.output
        worker.proc.kill()
        await worker.wait()
        raise AssertionError(
            f"{worker.name} did not exit within {grace_s + EXIT_MARGIN_S}s of SIGTERM:\n{output}"
        ) from None
    assert code == 0, f"{worker.name} exited with {code}:\n{worker.output}"


async def test_rolling_restart_ends_every_job_once_with_its_full_text(
    redis_server: RedisServerProcess, slow_model: ThreadedModelServer, prefix: str, redis: Redis
) -> None:
    settings = make_settings(
        redis_server.url, slow_model.base_url, prefix,
        TOKENBUS_SHUTDOWN_GRACE=GRACE_S, TOKENBUS_MAX_JOBS=4, TOKENBUS_MAX_TRIES=20,
    )  # fmt: skip
    workers = await start_workers(settings, 3)
    try:
        async with await TokenbusClient.connect(settings) as client:
            job_ids = [
                await client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom" if i % 2 else "messages"])
                for i in range(60)
            ]
        followers = asyncio.gather(*(view_within(redis, prefix, job_id, 180) for job_id in job_ids))

        async def all_ended() -> bool:
            views = await asyncio.gather(*(job_result(redis, job_id, prefix=prefix) for job_id in job_ids))
            return all(v.done for v in views)

        restarts = 0
        for _ in range(3):
            for i in range(len(workers)):
                if await all_ended():
                    break
                old = workers[i]
                replacement = asyncio.create_task(start_workers(settings, 1, name=f"{old.name}-r"))
                try:
                    await sigterm_and_wait(old, GRACE_S)
                finally:
                    workers[i] = (await replacement)[0]
                restarts += 1
        views = await followers
        await asyncio.gather(*(sigterm_and_wait(w, GRACE_S) for w in workers))
    finally:
        await stop_all(workers)

    problems, interrupted = [], 0
    for job_id, view in zip(job_ids, views, strict=True):
        stream = await read_stream(redis, settings.keys.job(job_id))
        interrupted += any(e.is_terminal and e.retry for e in stream)
        ends = finals(stream)
        if [e.type for e in ends] != [EntryType.END]:
            problems.append(f"{job_id}: final terminal entries {[(e.type.value, e.attempt, e.error) for e in ends]}")
            continue
        after = stream[stream.index(ends[0]) + 1 :]
        if after:
            problems.append(f"{job_id}: entries after the final end: {[(e.type.value, e.attempt) for e in after]}")
        newest = newest_attempt(stream)
        if [e.seq for e in newest] != list(range(len(newest))) or newest[-1] is not ends[0]:
            problems.append(f"{job_id}: attempt {newest[0].attempt} is not one clean run")
        if (view.status, view.text) != (EntryType.END, JOKE + POEM):
            problems.append(f"{job_id}: the follower saw {view.status} with {len(view.text)} chars")
    assert not problems, "\n".join(problems)
    assert interrupted, f"{restarts} restarts interrupted no job: the test proved nothing"
    print(f"rolling restart: {restarts} restarts, {interrupted} of {len(job_ids)} jobs interrupted and run again")


@pytest.mark.timeout(300)  # twelve worker starts: on a busy machine their imports alone take minutes
async def test_sigterm_as_a_worker_starts_exits_within_grace(
    redis_server: RedisServerProcess, model_server: ThreadedModelServer, prefix: str
) -> None:
    """SIGTERM the moment a worker serves, while its first Redis calls are in flight (its sweeper's
    first pass on a new connection): a cancellation lost there kept a worker from ever exiting."""
    settings = make_settings(redis_server.url, model_server.base_url, prefix, TOKENBUS_SHUTDOWN_GRACE=GRACE_S)
    for round_ in range(3):
        workers = await start_workers(settings, 4, name=f"round{round_}")
        try:
            await asyncio.gather(*(sigterm_and_wait(w, GRACE_S) for w in workers))
        finally:
            await stop_all(workers)


# -- 3. SIGKILL with the default settings -----------------------------------------------------------

NEXT_ATTEMPT_WITHIN_S = 20


async def test_sigkill_with_default_settings_runs_the_job_again_within_seconds(
    redis_server: RedisServerProcess, paced_model: ThreadedModelServer, prefix: str, redis: Redis, rng: random.Random
) -> None:
    settings = Settings(
        redis_url=redis_server.url,
        prefix=prefix,
        queue_name=f"{prefix}:queue",
        openai_base_url=paced_model.base_url,
    )  # nothing else: the default heartbeat, lease and timeouts
    modes: tuple[StreamMode, ...] = ("messages", "custom")
    mode, kill_at = rng.choice(modes), rng.randint(2, 60)
    print(f"mode {mode}, SIGKILL at chunk {kill_at}")
    workers = await start_workers(settings, 2)
    killed = asyncio.Event()
    killed_at = 0.0
    try:
        async with await TokenbusClient.connect(settings) as client:
            job_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=[mode])

        async def on_chunk(entry: Entry) -> None:
            nonlocal killed_at
            if entry.attempt == 1 and entry.seq == kill_at and not killed.is_set():
                runner = await wait_until(
                    lambda: next((w for w in workers if any(f"{job_id}:" in line for line in w.stderr)), None),
                    what="the worker running the job",
                )
                assert runner is not None
                runner.proc.kill()
                killed_at = time.monotonic()
                killed.set()
                assert await runner.wait() == -signal.SIGKILL

        follower = asyncio.create_task(follow_job(redis, prefix, job_id, on_chunk))
        try:
            await asyncio.wait_for(killed.wait(), 30)

            async def next_start() -> Entry | None:
                stream = await read_stream(redis, settings.keys.job(job_id))
                return next((e for e in stream if e.type is EntryType.START and e.attempt == 2), None)

            await wait_for(next_start, within=NEXT_ATTEMPT_WITHIN_S, what="attempt 2's start entry after the kill")
            print(f"attempt 2 started {time.monotonic() - killed_at:.1f}s after the kill")
            view, entries = await follower
        finally:
            follower.cancel()
    finally:
        await stop_all(workers)

    assert (view.status, view.attempt) == (EntryType.END, 2), view
    assert view.text == JOKE + POEM
    newest = [e.seq for e in entries if e.attempt == 2]
    assert newest == list(range(len(newest))), "duplicates or holes in what the follower saw"
    stream = await read_stream(redis, settings.keys.job(job_id))
    closed = [e for e in stream if e.attempt == 1 and e.is_terminal]
    start2 = next(e for e in stream if e.type is EntryType.START and e.attempt == 2)
    assert len(closed) == 1 and closed[0].retry, [(e.type.value, e.retry) for e in closed]
    assert stream.index(closed[0]) < stream.index(start2), "attempt 1 was closed after attempt 2 started"


# -- 4. a stalled worker ------------------------------------------------------------------------------


async def test_stalled_worker_writes_nothing_after_its_lease_is_taken_over(
    redis_server: RedisServerProcess, slow_model: ThreadedModelServer, prefix: str, redis: Redis
) -> None:
    settings = make_settings(redis_server.url, slow_model.base_url, prefix, TOKENBUS_HEARTBEAT=1)
    [stalled] = await start_workers(settings, 1, name="stalled")
    workers = [stalled]
    stopped = asyncio.Event()
    try:
        async with await TokenbusClient.connect(settings) as client:
            job_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"])

            async def on_chunk(entry: Entry) -> None:
                if entry.attempt == 1 and entry.seq >= 3 and not stopped.is_set():
                    stalled.proc.send_signal(signal.SIGSTOP)
                    stopped.set()

            follower = asyncio.create_task(follow_job(redis, prefix, job_id, on_chunk))
            try:
                await asyncio.wait_for(stopped.wait(), 30)
                before = await read_stream(redis, settings.keys.job(job_id))
                assert not any(e.is_terminal for e in before), (
                    "attempt 1 ended before the stop: the test proves nothing"
                )
                workers += await start_workers(settings, 1, name="other")

                async def next_start() -> Entry | None:
                    stream = await read_stream(redis, settings.keys.job(job_id))
                    return next((e for e in stream if e.type is EntryType.START and e.attempt == 2), None)

                start2 = await wait_for(next_start, within=30, what="another worker's attempt 2 to start")
            finally:
                stalled.proc.send_signal(signal.SIGCONT)
            view, _ = await follower
            assert (view.status, view.attempt, view.text) == (EntryType.END, 2, JOKE + POEM), view

            await sigterm_and_wait(workers.pop(), settings.shutdown_grace_s)  # the stalled one serves alone
            assert_alive([stalled])
            again = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"])
            view_again = await view_within(redis, prefix, again, 30)
            assert (view_again.status, view_again.text) == (EntryType.END, JOKE + POEM)
            assert_alive([stalled])
    finally:
        await stop_all(workers)

    late = []  # attempt 1's entries after attempt 2's start: in the job stream by id, in a tag stream
    # after an entry of attempt 2 or in a later millisecond (ids of different streams share Redis's clock)
    for key in (settings.keys.job(job_id), settings.keys.tag("joke"), settings.keys.tag("poem")):
        stream = [e for e in await read_stream(redis, key) if e.job == job_id]
        seen_attempt_2 = False
        for entry in stream:
            seen_attempt_2 = seen_attempt_2 or entry.attempt == 2
            if entry.attempt == 1 and (seen_attempt_2 or stream_id(entry)[0] > stream_id(start2)[0]):
                late.append(f"{key}: {entry.type.value} seq {entry.seq} ({entry.id})")
    assert not late, "the stalled worker wrote attempt 1 after attempt 2 started:\n" + "\n".join(late)
    assert [e.type for e in finals(await read_stream(redis, settings.keys.job(job_id)))] == [EntryType.END]


# -- 5. a job id re-used after arq's result expired ----------------------------------------------------


async def test_job_id_reused_after_its_result_expired_is_not_run_again(
    settings: Settings, client: TokenbusClient, redis: Redis
) -> None:
    workers = await start_workers(settings, 1)
    job_id = f"{settings.prefix}-once"
    queue = settings.queue_name

    async def processed() -> bool:
        assert_alive(workers)
        keys = (job_key_prefix + job_id, in_progress_key_prefix + job_id)
        return await redis.zscore(queue, job_id) is None and not await redis.exists(*keys)

    try:
        assert await client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"], job_id=job_id) == job_id
        view = await view_within(redis, settings.prefix, job_id, 30)
        assert view.status is EntryType.END
        await wait_for(lambda: redis.exists(result_key_prefix + job_id), what="arq's result")
        await wait_for(processed, what="arq to finish the job")
        before = await redis.xrange(settings.keys.job(job_id))

        await redis.delete(result_key_prefix + job_id)  # arq's result expired; the job stream is kept longer
        assert await client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"], job_id=job_id) == job_id
        await wait_for(processed, what="the re-enqueued job to leave the queue")
        assert await redis.xrange(settings.keys.job(job_id)) == before, "the job ran again (TokenbusClient)"

        await redis.delete(result_key_prefix + job_id)
        await raw_enqueue(redis, queue, job_id.encode(), _envelope())
        await wait_for(processed, what="the raw re-enqueued job to leave the queue")
        assert await redis.xrange(settings.keys.job(job_id)) == before, "the job ran again (raw arq enqueue)"
        assert_alive(workers)
    finally:
        await stop_all(workers)


# -- 6. Redis out of memory ------------------------------------------------------------------------------


@pytest.fixture
def oom_redis() -> Iterator[RedisServerProcess]:
    """A private server whose maxmemory the test lowers (never the session's shared one)."""
    server = RedisServerProcess(extra_args=("--maxmemory-policy", "noeviction"))
    server.start()
    yield server
    server.close()


async def _has_entries(redis: Redis, key: str, at_least: int) -> bool:
    return bool(await redis.xlen(key) >= at_least)


async def _oom_refusals(redis: Redis) -> int:
    stats = await redis.info("errorstats")
    oom = stats.get("errorstat_OOM")  # {"count": N}, or "count=N" from older redis-py 5.0.x
    if isinstance(oom, str):
        oom = dict(part.split("=", 1) for part in oom.split(","))
    return int(oom["count"]) if isinstance(oom, dict) else 0


async def test_redis_out_of_memory_fails_the_job_once_and_the_worker_survives(
    oom_redis: RedisServerProcess, slow_model: ThreadedModelServer, prefix: str
) -> None:
    settings = make_settings(oom_redis.url, slow_model.base_url, prefix)
    redis = Redis.from_url(oom_redis.url, socket_timeout=30)
    workers = await start_workers(settings, 1)
    model = slow_model.server
    try:
        async with await TokenbusClient.connect(settings) as client:
            job_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"])
        poem = settings.keys.tag("poem")
        await wait_for(lambda: _has_entries(redis, poem, 3), what="the poem's first tokens")
        streams_ended = model.streams_finished + model.streams_abandoned
        used = int((await redis.info("memory"))["used_memory"])
        await redis.config_set("maxmemory", used + 1024)  # just above: the job's next writes are refused
        await wait_for(lambda: _oom_refusals(redis), what="Redis to refuse the worker's writes")
        await wait_until(
            lambda: model.streams_finished + model.streams_abandoned > streams_ended,
            what="the job's model stream to end (its error path begun, under OOM)",
        )
        await redis.config_set("maxmemory", 0)

        view = await view_within(redis, settings.prefix, job_id, 30, workers)
        assert view.status is EntryType.ERROR, view
        assert "OOM" in view.error or "could not be written" in view.error, view.error
        assert "\n" not in view.error and len(view.error) < MAX_ERROR_CHARS, view.error
        stream = await read_stream(redis, settings.keys.job(job_id))
        assert len(finals(stream)) == 1 and stream[-1].is_final, [(e.type.value, e.retry) for e in finals(stream)]

        async def released() -> bool:
            assert_alive(workers)
            claimed = await redis.exists(in_progress_key_prefix + job_id, job_key_prefix + job_id)
            return not claimed and await redis.zscore(settings.queue_name, job_id) is None

        await wait_for(released, what="the job to be released (no in-progress key, off the queue)")
        async with await TokenbusClient.connect(settings) as client:
            again = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"])
        assert (await view_within(redis, settings.prefix, again, 30)).status is EntryType.END
        assert_alive(workers)
    finally:
        await stop_all(workers)
        await redis.aclose()


class _TagsState(TypedDict, total=False):
    tags: list[str]
    n: int
    done: bool


async def _to_tags(state: _TagsState, writer: StreamWriter) -> _TagsState:
    for i in range(state.get("n", 20)):
        writer({"content": f"{i} ", "tags": state.get("tags", [])})
    return {"done": True}


to_tags = StateGraph(_TagsState).add_node("node", _to_tags).add_edge(START, "node").compile()
"""Writes ``n`` custom chunks tagged with the request's ``tags``: where its streams live is the test's choice."""


def _cluster_prefix(cluster: RedisClusterProcesses, prefix: str) -> tuple[str, list[str]]:
    """A prefix whose own keys (running, finished, workers, dead letters) leave one master free,
    and three tags on three masters, the first on that free master."""
    for i in range(1000):
        keys = StreamKeys(f"{prefix}{i}")
        shared = {cluster.master_of(key).port for key in (keys.running, keys.finished, keys.workers, keys.dead_letter)}
        tags = spread(cluster, keys.tag, 3)
        free = [t for t in tags if cluster.master_of(keys.tag(t)).port not in shared]
        if free:
            return keys.prefix, [free[0], *(t for t in tags if t != free[0])]
    raise AssertionError("no prefix leaves a master free of the deployment's own keys")


@pytest.fixture
async def full_master(redis_cluster: RedisClusterProcesses, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """Fills a master of the session's cluster (``maxmemory`` tiny, ``noeviction``) when called
    with a key it serves; restores its settings after the test (the cluster is shared). The
    in-process worker's retries of a refused terminal entry are cut from ~16 s to 0.3 s: what is
    tested is what happens after the last one, not their length."""
    monkeypatch.setattr(tokenbus.worker.job, "TERMINAL_BACKOFF_S", (0.1, 0.2))
    restore: list[tuple[Redis, dict[str, str]]] = []

    async def fill(key: str) -> Redis:
        node = redis_cluster.master_of(key)
        client = Redis(host="127.0.0.1", port=node.port, socket_timeout=10)
        before = await client.config_get("maxmemory*")
        restore.append((client, {k: before[k] for k in ("maxmemory", "maxmemory-policy")}))
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", 1)  # below what any node uses: every write refused
        return client

    yield fill
    for client, before in restore:
        await client.config_set("maxmemory-policy", before["maxmemory-policy"])
        await client.config_set("maxmemory", before["maxmemory"])
        await client.aclose()


async def test_one_cluster_master_out_of_memory_fails_only_the_jobs_writing_there(
    redis_server: RedisServerProcess, redis_cluster: RedisClusterProcesses, model_server: ThreadedModelServer,
    prefix: str, full_master: Any,
) -> None:  # fmt: skip
    """One master of the streams' cluster refuses writes (``OOM``), and stays full: a job writing a
    tag stream there ends with an error naming the key and the refusal, in its job stream (on
    another master), once; a job whose streams live elsewhere ends normally meanwhile; once the
    master has room again, the same worker runs a job on that tag to its end."""
    prefix, (full_tag, calm_tag, _) = _cluster_prefix(redis_cluster, prefix)
    settings = make_settings(
        redis_server.url, model_server.base_url, prefix,
        TOKENBUS_STREAMS_URL=redis_cluster.url, TOKENBUS_STREAMS_CLUSTER="true",
        TOKENBUS_GRAPHS={"to_tags": "tests.test_adversary:to_tags"},
    )  # fmt: skip
    keys = settings.keys
    full_key = keys.tag(full_tag)
    # arq's keys of a job id are the queue Redis's, shared by every test: ids of this test's own
    bad, good = (
        f"{prefix}-{n}" for n in spread(redis_cluster, lambda n: keys.job(f"{prefix}-{n}"), 2, taken=(full_key,))
    )
    assert full_tag != calm_tag and redis_cluster.master_of(keys.tag(calm_tag)) is not redis_cluster.master_of(full_key)

    streams = streams_from_settings(settings)
    worker = build_worker(settings, handle_signals=False, poll_delay_s=0.05)
    running = asyncio.create_task(worker.async_run())
    try:
        node = await full_master(full_key)
        async with await TokenbusClient.connect(settings) as client:
            await client.enqueue("to_tags", {"tags": [calm_tag, full_tag]}, modes=["custom"], job_id=bad)
            await client.enqueue("to_tags", {"tags": [calm_tag]}, modes=["custom"], job_id=good)
            view = await view_within(streams, prefix, good, 30)
            assert (view.status, view.text) == (EntryType.END, "".join(f"{i} " for i in range(20))), view
            failed = await view_within(streams, prefix, bad, 30)
            assert failed.status is EntryType.ERROR, failed
            assert f"{full_key}: OOM" in failed.error, failed.error
            assert "\n" not in failed.error and len(failed.error) < MAX_ERROR_CHARS, failed.error
            # the job's terminal entry keeps being refused on the full master: the worker tries
            # again for a while, then gives up; the job is over once arq counts it done
            await wait_until(lambda: worker.jobs_complete + worker.jobs_failed >= 2, within=60, what="both jobs done")
            assert not running.done()
            job = await read_stream(streams, keys.job(bad))
            # written again and again, it is one terminal entry: copies of one seq, which readers drop
            assert len({(e.attempt, e.seq) for e in finals(job)}) == 1, [(e.type.value, e.seq) for e in finals(job)]
            replay = await job_result(streams, bad, prefix=prefix)
            assert (replay.status, replay.error, replay.complete, replay.chunks) == (
                EntryType.ERROR,
                failed.error,
                True,
                20,
            ), replay
            calm = [e for e in await read_stream(streams, keys.tag(calm_tag)) if e.job == bad]
            assert {(e.type, e.seq) for e in finals(calm)} == {(EntryType.ERROR, finals(job)[0].seq)}

            await node.config_set("maxmemory", 0)  # room again: the same worker writes there
            again = await client.enqueue("to_tags", {"tags": [full_tag]}, modes=["custom"])
            view = await view_within(streams, prefix, again, 30)
            assert view.status is EntryType.END, view
    finally:
        await worker.close()
        await stop_task(running)
        await streams.aclose()


async def test_a_job_whose_own_stream_master_is_full_is_closed_once_it_has_room(
    redis_server: RedisServerProcess, redis_cluster: RedisClusterProcesses, model_server: ThreadedModelServer,
    prefix: str, full_master: Any,
) -> None:  # fmt: skip
    """The master holding a job's own stream refuses every write (``OOM``): no entry of the job,
    not even its end, gets in, and its worker gives up. A reader waiting on the job is not left
    waiting forever: the job stays listed as running (its heartbeat stopped), and once the master
    has room a sweeper writes its end."""
    prefix, (full_tag, calm_tag, _) = _cluster_prefix(redis_cluster, prefix)
    settings = make_settings(
        redis_server.url, model_server.base_url, prefix,
        TOKENBUS_STREAMS_URL=redis_cluster.url, TOKENBUS_STREAMS_CLUSTER="true", TOKENBUS_HEARTBEAT="0.5",
        TOKENBUS_GRAPHS={"to_tags": "tests.test_adversary:to_tags"},
    )  # fmt: skip
    keys = settings.keys
    full = redis_cluster.master_of(keys.tag(full_tag))  # none of the deployment's own keys live there
    bad = next(j for i in range(10_000) if redis_cluster.master_of(keys.job(j := f"{prefix}-j{i}")) is full)
    streams = streams_from_settings(settings)
    worker = build_worker(settings, handle_signals=False, poll_delay_s=0.05)
    running = asyncio.create_task(worker.async_run())
    try:
        node = await full_master(keys.job(bad))
        async with await TokenbusClient.connect(settings) as client:
            await client.enqueue("to_tags", {"tags": [calm_tag]}, modes=["custom"], job_id=bad)
            waiting = asyncio.create_task(job_result(streams, bad, prefix=prefix, wait=True))
            await wait_until(lambda: worker.jobs_complete + worker.jobs_failed >= 1, within=60, what="the job done")
            assert await streams.xlen(keys.job(bad)) == 0  # nothing of it got in
            assert await streams.zscore(keys.running, bad) is not None, "its end is unwritten: it must stay listed"
            assert not waiting.done()

            await node.config_set("maxmemory", 0)  # room again: a sweeper (this worker's) writes its end
            view = await asyncio.wait_for(waiting, 60)
            assert view.status is EntryType.ERROR and view.attempt == 1, view
            assert "stopped without ending it" in view.error, view.error
            await wait_for(lambda: _unlisted(streams, keys.running, bad), what="the job off the running list")
    finally:
        await worker.close()
        await stop_task(running)
        await streams.aclose()


async def _unlisted(redis: Any, key: str, job_id: str) -> bool:
    return await redis.zscore(key, job_id) is None
