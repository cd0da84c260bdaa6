"""Other ways to reach Redis than plain TCP: a Unix socket and TLS, the whole flow through each, on
both event loops (asyncio, and uvloop as the ``tokenbus`` CLI runs). The publisher's wire takes
over the connection redis-py opened, and the reader reads on one of its own: both must work on
every kind of connection redis-py makes."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop
from redis.asyncio import Redis

from tests.conftest import RunWorker
from tests.support import JOKE, POEM, follow_job
from tokenbus.consumer.jobs import JobView
from tokenbus.redis_server import RedisServerProcess, free_port
from tokenbus.schemas.entries import EntryType
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.settings import Settings


@pytest.fixture
def unix_redis() -> Iterator[str]:
    """A private server that also listens on a Unix socket; yields its ``unix://`` URL."""
    with tempfile.TemporaryDirectory(prefix="tb-") as directory:  # short: socket paths are capped
        socket_path = f"{directory}/redis.sock"
        server = RedisServerProcess(extra_args=("--unixsocket", socket_path, "--unixsocketperm", "700"))
        server.start()
        try:
            yield f"unix://{socket_path}"
        finally:
            server.close()


TLS = Path(__file__).parent / "tls"  # a self-signed certificate for 127.0.0.1, valid until 2126


@pytest.fixture
def tls_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private server that takes TLS connections; yields its ``rediss://`` URL. Clients trust its
    certificate the way a deployment trusts a private CA: through OpenSSL's ``SSL_CERT_FILE``."""
    tls_port = free_port()
    server = RedisServerProcess(
        extra_args=(
            "--tls-port", str(tls_port), "--tls-cert-file", str(TLS / "redis.crt"),
            "--tls-key-file", str(TLS / "redis.key"), "--tls-ca-cert-file", str(TLS / "redis.crt"),
            "--tls-auth-clients", "no",
        )
    )  # fmt: skip
    server.start()  # its plain port answers the readiness check; the test uses the TLS one
    monkeypatch.setenv("SSL_CERT_FILE", str(TLS / "redis.crt"))
    try:
        yield f"rediss://127.0.0.1:{tls_port}/0"
    finally:
        server.close()


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("server", ["unix_redis", "tls_redis"])
def test_the_whole_flow_works_over_unix_sockets_and_tls(
    server: str, loop: str, request: pytest.FixtureRequest, settings: Settings, run_burst_worker: RunWorker
) -> None:
    """REDIS_URL=unix://... or rediss://...: enqueue, the worker's arq connection and publisher,
    and the reader, on the event loop given (as ``tokenbus`` runs its commands)."""
    url: str = request.getfixturevalue(server)
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        view = runner.run(_job_through(url, settings, run_burst_worker))
    assert (view.status, view.text) == (EntryType.END, JOKE + POEM)


async def _job_through(url: str, settings: Settings, run_burst_worker: RunWorker) -> JobView:
    elsewhere = settings.model_copy(update={"redis_url": url})
    async with await TokenbusClient.connect(elsewhere) as client:
        job_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages"])
    await run_burst_worker(redis_url=url)
    reader = Redis.from_url(url, socket_timeout=5)
    try:
        view, _ = await follow_job(reader, settings.prefix, job_id)
    finally:
        await reader.aclose()
    return view
