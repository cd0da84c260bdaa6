"""Bad input fails its own job with an error a person can act on; the worker keeps serving."""

from __future__ import annotations

from pathlib import Path

import pytest
from arq.connections import ArqRedis
from redis.asyncio import Redis

from tests.conftest import STREAMS
from tests.support import POEM, Process, read_stream, settings_env, text_of
from tokenbus.redis_server import RedisServerProcess
from tokenbus.schemas.entries import EntryType
from tokenbus.schemas.errors import InvalidJobRequest, InvalidTag
from tokenbus.schemas.job import JOB_FUNCTION
from tokenbus.worker.app import STARTUP_WAIT_S
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.redis_client import StreamsRedis
from tokenbus.worker.settings import Settings


async def _enqueue_raw(pool: ArqRedis, job_id: str, request: object) -> None:
    """Enqueue as a producer in another language would: no client-side validation."""
    assert await pool.enqueue_job(JOB_FUNCTION, request, _job_id=job_id) is not None


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            {"graph": "no_such_graph", "input": {}},
            "unknown graph 'no_such_graph'; this worker serves: joke_poem",
        ),
        ({"graph": "joke_poem", "input": '{"topic": "cats"'}, "input is not valid JSON"),
        ({"graph": "joke_poem", "input": "[1, 2]"}, "input must be a JSON object, got list"),
        (
            {"graph": "joke_poem", "tags": ["bad tag"]},
            "invalid tag 'bad tag': characters ' ' are not allowed",
        ),
        (
            {"graph": "joke_poem", "modes": ["debug"]},
            "modes.0: Input should be 'messages', 'custom', 'updates' or 'values'",
        ),
        ({"graph": "joke_poem", "bogus": 1}, "bogus: Extra inputs are not permitted"),
        ("not a request", "expected a JSON object such as"),
        ({"graph": "joke_poem", "input": {"topic": "explode-error"}}, "scripted failure mid-stream"),
        ({"graph": "joke_poem", "input": {"topic": "explode-status"}}, "Error code: 500"),
        (
            {"graph": "joke_poem", "input": {"topic": "explode-drop"}},
            "peer closed connection without sending complete message body",
        ),
    ],
    ids=[
        "unknown-graph",
        "malformed-json",
        "json-not-object",
        "invalid-tag",
        "bad-mode",
        "extra-field",
        "not-an-object",
        "http-error-mid-stream",
        "http-500",
        "connection-dropped",
    ],
)
async def test_bad_job_ends_with_error_and_next_job_succeeds(
    request_: object,
    message: str,
    settings: Settings,
    arq_pool: ArqRedis,
    client: TokenbusClient,
    redis: Redis,
    run_burst_worker,
) -> None:
    bad_id = f"{settings.prefix}-bad"
    await _enqueue_raw(arq_pool, bad_id, request_)
    good = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages"])
    worker = await run_burst_worker(max_jobs=1)  # one at a time: the good job runs after the bad one

    bad = await read_stream(redis, settings.keys.job(bad_id))
    assert bad[0].type is EntryType.START
    assert bad[-1].type is EntryType.ERROR and not bad[-1].retry
    assert message in bad[-1].error, bad[-1].error
    assert [e.type for e in bad].count(EntryType.ERROR) == 1
    ok = await read_stream(redis, settings.keys.job(good))
    assert ok[-1].type is EntryType.END
    assert text_of(await read_stream(redis, settings.keys.tag("poem"))).endswith(POEM)
    assert worker.jobs_failed == 1 and worker.jobs_complete == 1


async def test_error_reaches_the_tag_streams_the_job_wrote_to(
    settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    job_id = await client.enqueue("joke_poem", {"topic": "explode-error"}, modes=["custom"])
    await run_burst_worker()
    joke = await read_stream(redis, settings.keys.tag("joke"))
    assert [e.type for e in joke if e.job == job_id][-1] is EntryType.ERROR
    assert len([e for e in joke if e.is_chunk]) == 3  # what the model sent before failing


async def test_job_timeout_is_an_error(
    settings: Settings, client: TokenbusClient, redis: Redis, run_burst_worker
) -> None:
    job_id = await client.enqueue("joke_poem", {"topic": "stall-forever"}, timeout_s=0.5)
    await run_burst_worker()
    job = await read_stream(redis, settings.keys.job(job_id))
    assert job[-1].type is EntryType.ERROR
    assert job[-1].error == "the job ran longer than its timeout of 0.5s"
    assert job[-1].error_type == "JobTimeout"


async def test_oversized_request_is_refused(
    settings: Settings, arq_pool: ArqRedis, redis: Redis, run_burst_worker
) -> None:
    big_id = f"{settings.prefix}-big"
    await _enqueue_raw(arq_pool, big_id, {"graph": "joke_poem", "input": {"topic": "x" * 5000}})
    await run_burst_worker(max_request_bytes=4096)
    job = await read_stream(redis, settings.keys.job(big_id))
    assert "this worker accepts at most 4096" in job[-1].error


async def test_client_refuses_what_the_worker_would(client: TokenbusClient) -> None:
    with pytest.raises(InvalidJobRequest, match="invalid tag 'a b'"):
        await client.enqueue("joke_poem", {}, tags=["a b"])
    with pytest.raises(InvalidJobRequest, match="input is not valid JSON"):
        await client.enqueue("joke_poem", "{nope")
    with pytest.raises(InvalidJobRequest, match="job_id"):
        await client.enqueue("joke_poem", {}, job_id="../../etc")


async def test_tags_can_never_leave_the_prefix(settings: Settings) -> None:
    keys = settings.keys
    for tag in ["a}b", "a b", "", "x" * 129, "é", "a*", "{poem}"]:
        with pytest.raises(InvalidTag):
            keys.tag(tag)
    assert keys.tag("poem") == f"{settings.prefix}:tag:{{poem}}"


@pytest.mark.parametrize("settings", STREAMS, indirect=True)  # on a cluster: refused by one master only
async def test_a_key_redis_refuses_fails_the_job_naming_it(
    settings: Settings, client: TokenbusClient, streams: StreamsRedis, run_burst_worker,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    await streams.set(settings.keys.tag("poem"), "not a stream")  # someone else's key, or a bad migration
    job_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"])
    await run_burst_worker()
    job = await read_stream(streams, settings.keys.job(job_id))
    assert job[-1].type is EntryType.ERROR
    assert f"XADD {settings.keys.tag('poem')}: WRONGTYPE" in job[-1].error, job[-1].error
    # refused for good: the terminal entry is not sent again and again (it would be refused each
    # time), and the log says it once, not once per refused chunk
    assert [e.type for e in job].count(EntryType.ERROR) == 1
    refusals = [r for r in caplog.records if "Redis refused" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]
    assert text_of(await read_stream(streams, settings.keys.tag("joke"))) != ""  # the other tag still got its chunks


async def test_config_cannot_set_langgraph_or_worker_keys(client: TokenbusClient) -> None:
    for key in ("__pregel_send", "tokenbus_job_id"):
        with pytest.raises(InvalidJobRequest, match="are LangGraph's or the worker's"):
            await client.enqueue("joke_poem", {}, config={key: 1})


async def test_a_long_hostile_id_is_not_echoed_in_full(client: TokenbusClient) -> None:
    with pytest.raises(InvalidJobRequest) as refused:
        await client.enqueue("joke_poem", {}, job_id="x" * 10_000 + " ")
    assert len(str(refused.value)) < 400 and "10003 characters" in str(refused.value)


async def test_enqueue_without_the_right_to_announce_prints_the_id_and_warns(
    settings: Settings, redis: Redis, redis_server: RedisServerProcess
) -> None:
    """An enqueuer that may not PUBLISH: the job is queued, so the id is printed (a retry would
    enqueue it twice) and the missing wake-up is a warning."""
    user = f"{settings.prefix}-nopublish"
    await redis.execute_command("ACL", "SETUSER", user, "on", ">pw", "allkeys", "+@all", "-publish")
    try:
        env = settings_env(settings)
        env["REDIS_URL"] = f"redis://{user}:pw@127.0.0.1:{redis_server.port}/0"
        enqueue = await Process.start("enqueue", "joke_poem", env=env, name="enqueue")
        assert await enqueue.wait() == 0, enqueue.output
        (job_id,) = enqueue.stdout
        assert await redis.zscore(settings.queue_name, job_id) is not None
        assert any("announcing it on" in line and "no permissions" in line for line in enqueue.stderr), enqueue.output
    finally:
        await redis.execute_command("ACL", "DELUSER", user)


async def test_a_worker_started_before_redis_waits_for_it(settings: Settings, client: TokenbusClient) -> None:
    later = RedisServerProcess()
    worker = await Process.start("worker", env=settings_env(settings.model_copy(update={"redis_url": later.url})))
    try:
        # arq retries once a second; past its default of 5 retries the worker used to exit
        await worker.wait_line(f"{STARTUP_WAIT_S - 6} retries remaining", within=60)
        later.start()
        await worker.wait_line("worker serves graphs")
        assert worker.proc.returncode is None
    finally:
        await worker.stop()
        later.close()


async def test_a_worker_given_an_app_dir_that_is_not_there_says_so_in_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    worker = await Process.start("worker", "--app-dir", str(tmp_path / "nosuch"), env=settings_env(settings))
    assert await worker.wait() == 2
    assert worker.stderr == [f"tokenbus: --app-dir {tmp_path / 'nosuch'}: no such directory"], worker.output
