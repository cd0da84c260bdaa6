"""Fixtures: a private redis-server per session, the offline model over real HTTP, and a fresh
key prefix and queue per test (no test shares keys; nothing is ever flushed)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio import Redis

from tests.browser import browser  # noqa: F401  (the fixture: a headless Chromium)
from tests.support import ENV_PREFIXES, FAULTS, ThreadedModelServer
from tokenbus.redis_server import RedisClusterProcesses, RedisServerProcess
from tokenbus.worker.app import build_worker
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.redis_client import StreamsRedis, streams_from_settings
from tokenbus.worker.serializer import job_deserializer, job_serializer
from tokenbus.worker.settings import Settings


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the test, never from the machine's environment."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIXES):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServerProcess]:
    server = RedisServerProcess()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    """A private 3-master / 3-replica Redis Cluster, shared by the session's cluster tests.

    A test that kills a node leaves the cluster failed over (still serving every slot); tests
    that need their own topology start a :class:`RedisClusterProcesses` of their own."""
    cluster = RedisClusterProcesses()
    cluster.start()
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def model_server() -> Iterator[ThreadedModelServer]:
    server = ThreadedModelServer(faults=FAULTS).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def paced_model() -> Iterator[ThreadedModelServer]:
    """The offline model at 250 tokens/s: about 0.5 s per joke_poem job, slow enough to be killed mid-stream."""
    server = ThreadedModelServer(tokens_per_s=250, faults=FAULTS).start()
    yield server
    server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServerProcess]:
    """A redis-server of the test's own, to stop or restart."""
    server = RedisServerProcess()
    server.start()
    yield server
    server.close()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


STREAMS = ("single", "cluster")
"""Where a test's streams may live (the ``settings`` fixture's parameter): on the queue's Redis,
or on the session's Redis Cluster (the queue stays on ``redis_server``). A test runs on both with
``@pytest.mark.parametrize("settings", STREAMS, indirect=True)``; unparametrized, on one Redis."""


@pytest.fixture
def settings(
    request: pytest.FixtureRequest, redis_server: RedisServerProcess, model_server: ThreadedModelServer, prefix: str
) -> Settings:
    streams = getattr(request, "param", "single")
    overrides: dict[str, Any] = {}
    if streams == "cluster":
        cluster: RedisClusterProcesses = request.getfixturevalue("redis_cluster")
        overrides = {"TOKENBUS_STREAMS_URL": cluster.url, "TOKENBUS_STREAMS_CLUSTER": "true"}
    elif streams != "single":
        raise ValueError(f"streams are {' or '.join(STREAMS)}, not {streams!r}")
    return make_settings(redis_server.url, model_server.base_url, prefix, **overrides)


@pytest.fixture
async def streams(settings: Settings) -> AsyncIterator[StreamsRedis]:
    """A client of the deployment holding ``settings``' streams (a Redis Cluster's, or one Redis's)."""
    client = streams_from_settings(settings)
    yield client
    await client.aclose()


@pytest.fixture
def paced_settings(redis_server: RedisServerProcess, paced_model: ThreadedModelServer, prefix: str) -> Settings:
    return make_settings(redis_server.url, paced_model.base_url, prefix)


def make_settings(redis_url: str, model_url: str, prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "REDIS_URL": redis_url,
        "TOKENBUS_PREFIX": prefix,
        "TOKENBUS_QUEUE": f"{prefix}:queue",
        "OPENAI_BASE_URL": model_url,
        "OPENAI_API_KEY": "test-key",
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
async def redis(redis_server: RedisServerProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, socket_timeout=30)
    yield client
    await client.aclose()


@pytest.fixture
async def arq_pool(settings: Settings) -> AsyncIterator[ArqRedis]:
    """A raw arq pool, to enqueue what the typed client would refuse (as another language might)."""
    pool = await create_pool(
        RedisSettings.from_dsn(settings.redis_url or ""),
        job_serializer=job_serializer,
        job_deserializer=job_deserializer,
        default_queue_name=settings.queue_name,
    )
    yield pool
    await pool.aclose()


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[TokenbusClient]:
    async with await TokenbusClient.connect(settings) as c:
        yield c


RunWorker = Callable[..., Awaitable[Any]]


@pytest.fixture
def run_burst_worker(settings: Settings) -> RunWorker:
    """Run an in-process worker until the queue is empty (arq's burst mode), then close it."""

    async def run(**overrides: Any) -> Any:
        worker_settings = settings.model_copy(update=overrides) if overrides else settings
        worker = build_worker(worker_settings, burst=True, handle_signals=False, poll_delay_s=0)
        try:
            await worker.async_run()
        finally:
            await worker.close()
        return worker

    return run
