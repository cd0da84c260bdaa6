"""Redis restarted or away mid-stream; consumer groups losing a consumer; a read-only ACL user."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from tests.conftest import make_settings
from tests.support import (
    JOKE,
    POEM,
    Process,
    ThreadedModelServer,
    follow_job,
    read_stream,
    settings_env,
    wait_for,
    wait_until,
)
from tokenbus.redis_server import RedisServerProcess
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.worker.app import build_worker
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.resources import WorkerResources
from tokenbus.worker.settings import Settings

pytestmark = pytest.mark.faults


@pytest.fixture
def aof_redis() -> Iterator[RedisServerProcess]:
    """A private server that fsyncs every write: what Redis acknowledged survives a SIGKILL."""
    server = RedisServerProcess(appendonly=True, appendfsync="always")
    server.start()
    yield server
    server.close()


@pytest.fixture
def aof_settings(aof_redis: RedisServerProcess, paced_model: ThreadedModelServer, prefix: str) -> Settings:
    return make_settings(aof_redis.url, paced_model.base_url, prefix, TOKENBUS_HEARTBEAT=0.2)


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[WorkerResources]:
    worker = build_worker(settings, burst=True, handle_signals=False, poll_delay_s=0)
    task = asyncio.create_task(worker.async_run())
    try:
        await wait_until(lambda: worker.ctx.get("tokenbus"), what="worker startup")
        yield worker.ctx["tokenbus"]
        async with asyncio.timeout(60):
            await task
    finally:
        await worker.close()


async def test_redis_restart_mid_stream_loses_no_acknowledged_entry(
    aof_redis: RedisServerProcess, aof_settings: Settings
) -> None:
    async with await TokenbusClient.connect(aof_settings) as client:
        job_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages"])
    reader = Redis.from_url(aof_redis.url, socket_timeout=5)
    try:
        async with running_worker(aof_settings) as resources:

            async def restart_once(entry: Entry) -> None:
                if entry.content.strip() == "sitting" and not resources.publisher.retries:
                    await asyncio.to_thread(aof_redis.stop, kill=True)  # a crash, mid-stream
                    await wait_until(lambda: resources.publisher.retries, what="the publisher to notice")
                    await asyncio.to_thread(aof_redis.start)  # same port, same AOF

            view, _ = await follow_job(reader, aof_settings.prefix, job_id, restart_once)
            retries = resources.publisher.retries
        stream = await read_stream(reader, aof_settings.keys.job(job_id))
    finally:
        await reader.aclose()
    assert retries > 0, "the restart did not hit the publisher: the test proved nothing"
    assert (view.status, view.text) == (EntryType.END, JOKE + POEM)
    seqs = sorted({e.seq for e in stream})
    assert seqs == list(range(stream[-1].seq + 1)), "entries were lost"
    print(f"restart: {len(stream)} entries stored ({len(stream) - len(seqs)} written twice), {retries} retries")


async def test_redis_away_past_the_limit_fails_the_job_saying_how_much_was_lost(
    aof_redis: RedisServerProcess, aof_settings: Settings
) -> None:
    settings = aof_settings.model_copy(update={"publish_give_up_s": 0.3})
    async with await TokenbusClient.connect(settings) as client:
        job_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"])
    reader = Redis.from_url(aof_redis.url, socket_timeout=5)
    try:
        async with running_worker(settings) as resources:
            await wait_for(
                lambda: reader.xlen(settings.keys.tag("joke")), what="the first tokens"
            )  # the job is streaming
            await asyncio.to_thread(aof_redis.stop, kill=True)
            lost = await wait_until(lambda: resources.publisher.lost_total, what="a batch given up")
            await asyncio.to_thread(aof_redis.start)
            view, _ = await follow_job(reader, settings.prefix, job_id, None)
        assert lost and view.status is EntryType.ERROR
        assert "could not be written to Redis" in view.error or "lost " in view.error, view.error
    finally:
        await reader.aclose()


async def test_read_only_acl_user_can_tail(redis: Redis, settings: Settings, redis_server: RedisServerProcess) -> None:
    user = f"{settings.prefix}-reader"
    await redis.execute_command(
        "ACL", "SETUSER", user, "on", ">secret", "resetkeys", f"~{settings.prefix}:tag:*",
        "-@all", "+@read", "+@connection", "+@stream", "-xadd", "-xdel", "-xtrim", "-xgroup",
    )  # fmt: skip
    try:
        env = settings_env(settings)
        env["REDIS_URL"] = f"redis://{user}:secret@127.0.0.1:{redis_server.port}/0"
        tail = await Process.start("tail", "--tag", "poem", "--format", "jsonl", env=env, name="tail")
        await tail.wait_line("following")
        entry = Entry(type="token", job="j", attempt=1, seq=0, ts=1, content="hi", tags=["poem"])
        await redis.xadd(settings.keys.tag("poem"), entry.encode())  # type: ignore[arg-type]
        await tail.wait_line('"content":"hi"', stream="stdout")
        await tail.stop()
        limited = Redis.from_url(env["REDIS_URL"])
        with pytest.raises(redis_errors.NoPermissionError):
            await limited.xadd(settings.keys.tag("poem"), {"v": "1"})
        with pytest.raises(redis_errors.NoPermissionError):
            await limited.xrange(settings.keys.job("j"))
        await limited.aclose()
    finally:
        await redis.execute_command("ACL", "DELUSER", user)
