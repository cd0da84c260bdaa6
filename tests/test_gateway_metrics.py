"""The gateway's own ``/metrics``, over real HTTP against a ``tokenbus serve`` process: counters that
move by what a client following a job over SSE was sent, and the access rules of reading endpoints."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx2
import pytest
from redis.asyncio import Redis

from tests.sse import free_port
from tests.support import Process, start_gateway, start_worker, wait_for
from tests.test_metrics import ROOT, Samples, parse, value
from tokenbus.worker.settings import Settings

pytestmark = pytest.mark.e2e

KEY = "metrics-api-key"


@pytest.fixture
async def worker(paced_settings: Settings) -> AsyncIterator[Process]:
    process = await start_worker(paced_settings)
    yield process
    await process.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(60, connect=10)) as client:
        yield client


async def gateway(settings: Settings, **env: str) -> AsyncIterator[str]:
    port = free_port()
    # heartbeats are written by sse-starlette, not counted: none come during these short streams
    process = await start_gateway(settings, port, TOKENBUS_GATEWAY_HEARTBEAT="600", **env)
    yield f"http://127.0.0.1:{port}"
    await process.stop()


@pytest.fixture
async def open_gateway(paced_settings: Settings) -> AsyncIterator[str]:
    async for url in gateway(paced_settings):
        yield url


@pytest.fixture
async def keyed_gateway(paced_settings: Settings) -> AsyncIterator[str]:
    async for url in gateway(paced_settings, TOKENBUS_GATEWAY_API_KEYS=KEY):
        yield url


async def scrape(http: httpx2.AsyncClient, url: str, **headers: str) -> Samples:
    response = await http.get(f"{url}/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def gateway_metrics(samples: Samples) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {k: v for k, v in samples.items() if k[0].startswith("tokenbus_gateway_")}


def requests(samples: Samples, route: str, method: str, status: int) -> float:
    return value(samples, "tokenbus_gateway_requests_total", route=route, method=method, status=str(status))


async def test_counters_move_by_what_a_client_following_a_job_was_sent(
    worker: Process, open_gateway: str, http: httpx2.AsyncClient, redis: Redis, paced_settings: Settings
) -> None:
    url = open_gateway
    before = await scrape(http, url)
    assert value(before, "tokenbus_gateway_sse_clients") == 0 and value(before, "tokenbus_gateway_hub_streams") == 0
    created = await http.post(f"{url}/jobs", json={"graph": "joke_poem", "input": {"topic": "cats"}})
    assert created.status_code == 201, created.text
    job = created.json()

    body, during = b"", None
    async with http.stream("GET", url + job["urls"]["events"]) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            body += chunk
            if during is None and b"\nid: " in body:  # following: scraped while the job streams
                during = await scrape(http, url)
    assert during is not None
    assert value(during, "tokenbus_gateway_sse_clients") == 1 and value(during, "tokenbus_gateway_hub_streams") == 1

    after = await wait_for(
        lambda: _scraped_when(http, url, lambda s: value(s, "tokenbus_gateway_sse_clients") == 0),
        what="the client to be counted as gone",
    )
    sent_events = len(re.findall(rb"^id: ", body, re.MULTILINE))
    assert sent_events == await redis.xlen(paced_settings.keys.job(job["job_id"])) > 10  # every entry, once
    assert delta(after, before, "tokenbus_gateway_entries_sent_total") == sent_events
    assert delta(after, before, "tokenbus_gateway_sent_bytes_total") == len(body)
    assert delta(after, before, "tokenbus_gateway_sse_connections_total") == 1
    assert value(after, "tokenbus_gateway_hub_streams") == 0  # nobody follows the job any more
    assert delta(after, before, "tokenbus_gateway_hub_reads_total") >= 1
    assert value(after, "tokenbus_gateway_overflow_disconnects_total") == 0
    assert value(after, "tokenbus_gateway_send_timeouts_total") == 0
    assert requests(after, "/jobs", "POST", 201) == 1
    assert requests(after, "/jobs/{job_id}/events", "GET", 200) == 1
    assert requests(after, "/metrics", "GET", 200) == requests(before, "/metrics", "GET", 200) + 2
    missing = await http.get(f"{url}/jobs/nosuch")
    assert missing.status_code == 404
    unrouted = await http.get(f"{url}/no/such/path")
    assert unrouted.status_code == 404
    last = await scrape(http, url)
    assert requests(last, "/jobs/{job_id}", "GET", 404) == 1
    assert requests(last, "other", "GET", 404) == 1  # any path: one label value
    assert_documented({name for name, _ in gateway_metrics(last)})


async def _scraped_when(http: httpx2.AsyncClient, url: str, check: object) -> Samples | None:
    samples = await scrape(http, url)
    return samples if check(samples) else None  # type: ignore[operator]


def delta(after: Samples, before: Samples, name: str) -> float:
    return value(after, name) - value(before, name)


def assert_documented(exposed: set[str]) -> None:
    """The README's metrics table lists the gateway's metrics (its rows of ``tokenbus_gateway_*``)."""
    readme = (ROOT / "README.md").read_text().split("### Metrics and health", 1)[1].split("### Is it healthy?", 1)[0]
    table = set(re.findall(r"^\| `(tokenbus_gateway_\w+)`", readme, re.MULTILINE))
    assert table == {re.sub(r"_total$", "", name) for name in exposed}


async def test_metrics_need_an_api_key_once_keys_are_set(keyed_gateway: str, http: httpx2.AsyncClient) -> None:
    url = keyed_gateway
    assert (await http.get(f"{url}/metrics")).status_code == 401
    created = await http.post(
        f"{url}/jobs", json={"graph": "joke_poem", "input": {}}, headers={"Authorization": f"Bearer {KEY}"}
    )
    token = created.json()["token"]  # a subscribe token reads its job, not the deployment's numbers
    assert (await http.get(f"{url}/metrics?token={token}")).status_code == 401
    assert (await http.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})).status_code == 401
    samples = await scrape(http, url, Authorization=f"Bearer {KEY}")
    assert requests(samples, "/metrics", "GET", 401) == 3
    assert requests(samples, "/jobs", "POST", 201) == 1
