"""The worker's /metrics and /healthz (TOKENBUS_METRICS_PORT): counters that agree with the streams,
and a health check that fails when Redis is away or the event loop is stuck."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from tests.conftest import make_settings
from tests.graphs import GATE
from tests.sse import free_port
from tests.support import ThreadedModelServer, follow_job, start_worker, wait_for, wait_until
from tokenbus.redis_server import RedisServerProcess
from tokenbus.schemas.entries import EntryType
from tokenbus.worker.app import METRICS, build_worker, stop_worker
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.settings import Settings

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
ROOT = Path(__file__).resolve().parent.parent


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(http: httpx2.AsyncClient, url: str) -> Samples:
    response = await http.get(f"{url}/metrics")
    assert response.status_code == 200, response.text
    return parse(response.text)


async def scrape_until(http: httpx2.AsyncClient, url: str, check: Callable[[Samples], bool], *, what: str) -> Samples:
    async def scraped() -> Samples | None:
        samples = await scrape(http, url)
        return samples if check(samples) else None

    return await wait_for(scraped, what=what)


async def health_until(http: httpx2.AsyncClient, url: str, status: int, *, what: str, within: float = 30) -> Any:
    async def answered() -> Any:
        try:
            response = await http.get(f"{url}/healthz")
        except httpx2.TransportError:
            return None
        return response.json() if response.status_code == status else None

    return await wait_for(answered, within=within, what=what)


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(timeout=10) as client:
        yield client


async def stream_total(redis: Redis, prefix: str) -> int:
    """Entries in every job and tag stream of the test's prefix."""
    return sum([await redis.xlen(key) async for key in redis.scan_iter(match=f"{prefix}:*:{{*}}", count=1000)])


async def test_counters_move_as_the_jobs_streams_say(
    settings: Settings, client: TokenbusClient, redis: Redis, http: httpx2.AsyncClient
) -> None:
    """Scraped while a job runs and after three have ended: jobs, chunks and entries counted as their
    streams hold them, by graph and status."""
    graphs = {"gated": "tests.graphs:gated", "bad_payload": "tests.graphs:bad_payload"}
    settings = settings.model_copy(update={"graphs": graphs, "metrics_port": 0, "max_jobs": 4})
    GATE["open"] = asyncio.Event()
    worker = build_worker(settings, handle_signals=False, poll_delay_s=0.05)
    task = asyncio.create_task(worker.async_run())
    try:
        server = await wait_until(lambda: worker.ctx.get(METRICS), what="the metrics endpoint")
        url = f"http://127.0.0.1:{server.address[1]}"
        gated = await client.enqueue("gated", {}, modes=["custom"])
        running = await scrape_until(
            http, url,
            lambda s: value(s, "tokenbus_chunks_published_total", graph="gated", type="custom") == 1
            and value(s, "tokenbus_queue_depth") == 0,  # running, so not waiting (once its heartbeat is written)
            what="the gated job's payload to be counted",
        )  # fmt: skip
        assert value(running, "tokenbus_jobs_running") == 1
        assert value(running, "tokenbus_jobs_started_total", graph="gated") == 1
        assert value(running, "tokenbus_job_slots") == 4
        assert value(running, "tokenbus_job_slots_free") == 3
        assert value(running, "tokenbus_jobs_finished_total", graph="gated", status="end") == 0
        assert value(running, "tokenbus_redis_up") == 1
        GATE["open"].set()
        joke = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages"])
        bad = await client.enqueue("bad_payload", {}, modes=["custom"])
        views = {job: (await follow_job(redis, settings.prefix, job))[0] for job in (gated, joke, bad)}
        assert [v.status for v in views.values()] == [EntryType.END, EntryType.END, EntryType.ERROR]
        ended = await scrape_until(
            http, url, lambda s: value(s, "tokenbus_jobs_running") == 0, what="the jobs to be counted as ended"
        )
    finally:
        await stop_worker(worker, task)
    for graph, status in (("gated", "end"), ("joke_poem", "end"), ("bad_payload", "error")):
        assert value(ended, "tokenbus_jobs_finished_total", graph=graph, status=status) == 1, (graph, status)
        assert value(ended, "tokenbus_job_duration_seconds_count", graph=graph) == 1
    tokens = views[joke].chunks
    assert tokens > 10 and value(ended, "tokenbus_chunks_published_total", graph="joke_poem", type="token") == tokens
    assert value(ended, "tokenbus_chunks_published_total", graph="bad_payload", type="custom") == 1  # then it failed
    assert value(ended, "tokenbus_time_to_first_token_seconds_count", graph="joke_poem") == 1
    assert value(ended, "tokenbus_entries_published_total") == await stream_total(redis, settings.prefix)
    assert value(ended, "tokenbus_entries_lost_total") == 0
    assert value(ended, "tokenbus_cluster_redirects_total") == 0  # one Redis
    assert value(ended, "tokenbus_cluster_slot_table_reloads_total") == 0
    batches = value(ended, "tokenbus_publish_batch_commands_count")
    assert batches > 0 and value(ended, "tokenbus_publish_round_trip_seconds_count") == batches
    assert value(ended, "tokenbus_publish_batch_commands_sum") >= value(ended, "tokenbus_entries_published_total")
    assert_documented({name for name, _ in ended})


def assert_documented(exposed: set[str]) -> None:
    """The README's metrics table lists what a worker exposes, and the dashboard queries only that
    (the gateway's rows are tests/test_gateway_metrics.py's)."""

    def family(name: str) -> str:
        return re.sub(r"_(total|bucket|count|sum)$", "", name)

    readme = (ROOT / "README.md").read_text().split("### Metrics and health", 1)[1].split("### Is it healthy?", 1)[0]
    rows = re.findall(r"^\| `(tokenbus_\w+)`(?: / `(tokenbus_\w+)`)?", readme, re.MULTILINE)
    table = {family(name) for row in rows for name in row if name and not name.startswith("tokenbus_gateway_")}
    assert table == {family(n) for n in exposed if n.startswith("tokenbus_")}
    dashboard = (ROOT / "deploy" / "grafana" / "tokenbus.json").read_text()
    assert set(re.findall(r"tokenbus_\w+", dashboard)) <= exposed


@pytest.mark.e2e
async def test_healthz_fails_while_redis_is_away_and_recovers(
    own_redis: RedisServerProcess, model_server: ThreadedModelServer, prefix: str, http: httpx2.AsyncClient
) -> None:
    port = free_port()
    settings = make_settings(own_redis.url, model_server.base_url, prefix, TOKENBUS_METRICS_PORT=port)
    url = f"http://127.0.0.1:{port}"
    worker = await start_worker(settings)
    try:
        assert (await health_until(http, url, 200, what="a healthy worker"))["status"] == "ok"
        await asyncio.to_thread(own_redis.stop)
        body = await health_until(http, url, 503, what="/healthz to fail without Redis")
        assert body["status"] == "unhealthy" and any("Redis" in p for p in body["problems"]), body
        samples = await scrape(http, url)  # the metrics still answer, saying so
        assert value(samples, "tokenbus_redis_up") == 0
        await asyncio.to_thread(own_redis.start)
        await health_until(http, url, 200, what="/healthz to recover with Redis back")
    finally:
        assert await worker.stop() == 0, worker.output


@pytest.mark.e2e
async def test_healthz_fails_while_a_graph_blocks_the_event_loop(
    settings: Settings, client: TokenbusClient, http: httpx2.AsyncClient
) -> None:
    """A user graph that calls time.sleep in an async node stops every job of the worker: the
    health check says so while it lasts."""
    port = free_port()
    settings = settings.model_copy(
        update={"graphs": {"blocks": "tests.graphs:blocks_the_loop"}, "metrics_port": port, "health_max_lag_s": 0.5}
    )
    url = f"http://127.0.0.1:{port}"
    worker = await start_worker(settings)
    try:
        await health_until(http, url, 200, what="a healthy worker")
        await client.enqueue("blocks", {"n": 40}, modes=["custom"])  # 4 s
        body = await health_until(http, url, 503, what="/healthz to fail while the loop is blocked")
        assert any("event loop is blocked" in p for p in body["problems"]), body
        await health_until(http, url, 200, what="/healthz to recover once the node returns")
        samples = await scrape(http, url)
        assert value(samples, "tokenbus_event_loop_lag_seconds_bucket", le="2.5") < value(
            samples, "tokenbus_event_loop_lag_seconds_count"
        )  # the blocked wake-up, late by seconds
    finally:
        assert await worker.stop() == 0, worker.output
