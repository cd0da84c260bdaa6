"""Who may use the gateway: API keys, subscribe tokens scoped to jobs and tags, loopback only
without keys; and bad requests answered with one JSON line that says why."""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import jwt
import pytest
from redis.asyncio import Redis

from tests.sse import Event, events, free_port
from tests.support import Process, entry, settings_env, start_gateway, worker_record, write
from tests.support import token as tok
from tests.test_gateway import stop_gateway
from tokenbus.gateway import GatewaySettings, create_app
from tokenbus.gateway.access import AUDIENCE, Access
from tokenbus.schemas.entries import EntryType
from tokenbus.worker.settings import Settings

pytestmark = pytest.mark.e2e

KEY = "key-for-tests"
SECRET = "secret-for-tests"
JOB = {"graph": "joke_poem", "input": {"topic": "cats"}}


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[str]:
    port = free_port()
    process: Process = await start_gateway(
        settings, port, TOKENBUS_GATEWAY_API_KEYS=f"other-key, {KEY}", TOKENBUS_GATEWAY_TOKEN_SECRET=SECRET
    )
    yield f"http://127.0.0.1:{port}"
    await stop_gateway(process)


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(timeout=30) as client:
        yield client


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def refused(response: httpx2.Response, status: int, error: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error and body["detail"], body
    detail: str = body["detail"]
    return detail


async def status_of(http: httpx2.AsyncClient, url: str, **headers: str) -> int:
    """The status of a GET; an SSE response is closed as soon as its head has come."""
    async with http.stream("GET", url, headers=headers) as response:
        return response.status_code


async def test_enqueueing_needs_an_api_key(gateway: str, http: httpx2.AsyncClient) -> None:
    refused(await http.post(f"{gateway}/jobs", json=JOB), 401, "unauthorized")
    refused(await http.post(f"{gateway}/jobs", json=JOB, headers=bearer("wrong")), 401, "unauthorized")
    ok = await http.post(f"{gateway}/jobs", json=JOB, headers=bearer(KEY))
    assert ok.status_code == 201 and ok.json()["token"]
    assert (await http.post(f"{gateway}/jobs", json=JOB, headers=bearer("other-key"))).status_code == 201


async def test_a_subscribe_token_grants_its_job_and_nothing_else(gateway: str, http: httpx2.AsyncClient) -> None:
    a = (await http.post(f"{gateway}/jobs", json=JOB, headers=bearer(KEY))).json()
    b = (await http.post(f"{gateway}/jobs", json=JOB, headers=bearer(KEY))).json()
    token = a["token"]
    assert await status_of(http, f"{gateway}/jobs/{a['job_id']}/events?token={token}") == 200
    assert (await http.get(f"{gateway}/jobs/{a['job_id']}", headers=bearer(token))).status_code == 200
    refused(await http.get(f"{gateway}/jobs/{b['job_id']}/events?token={token}"), 403, "forbidden")
    refused(await http.get(f"{gateway}/jobs/{b['job_id']}", headers=bearer(token)), 403, "forbidden")
    refused(await http.get(f"{gateway}/tags/poem/events?token={token}"), 403, "forbidden")
    # a token reads; only a key cancels, enqueues or mints tokens
    refused(await http.delete(f"{gateway}/jobs/{a['job_id']}", headers=bearer(token)), 401, "unauthorized")
    refused(await http.post(f"{gateway}/tokens", json={"tags": ["poem"]}, headers=bearer(token)), 401, "unauthorized")
    # reading with no credential at all
    refused(await http.get(f"{gateway}/jobs/{a['job_id']}/events"), 401, "unauthorized")


async def test_tag_tokens_grant_exactly_their_tags(gateway: str, http: httpx2.AsyncClient) -> None:
    minted = await http.post(f"{gateway}/tokens", json={"tags": ["poem"], "ttl_s": 60}, headers=bearer(KEY))
    assert minted.status_code == 200 and minted.json()["expires"] <= time.time() + 61
    token = minted.json()["token"]
    assert await status_of(http, f"{gateway}/tags/poem/events?token={token}") == 200
    detail = refused(await http.get(f"{gateway}/tags/poem/events?tag=joke&token={token}"), 403, "forbidden")
    assert "joke" in detail
    refused(await http.get(f"{gateway}/jobs/any/events?token={token}"), 403, "forbidden")
    refused(await http.post(f"{gateway}/tokens", json={"ttl_s": 60}, headers=bearer(KEY)), 400, "invalid_request")
    refused(await http.post(f"{gateway}/tokens", json={"tags": ["bad tag"]}, headers=bearer(KEY)), 400, "invalid_name")


def forged(claims: dict[str, Any], secret: str = SECRET) -> str:
    """A token signed as a gateway with ``secret`` signs them."""
    return Access([KEY], secret=secret).sign({"iat": int(time.time()), **claims})


async def test_expired_forged_and_misplaced_credentials_are_refused(gateway: str, http: httpx2.AsyncClient) -> None:
    url = f"{gateway}/tags/poem/events?token="
    expired = forged({"exp": int(time.time()) - 5, "tags": ["poem"]})
    assert "expired" in refused(await http.get(url + expired), 401, "token_expired")
    other_secret = forged({"exp": int(time.time()) + 60, "tags": ["poem"]}, secret="not-the-secret")
    refused(await http.get(url + other_secret), 401, "invalid_token")
    no_expiry = forged({"tags": ["poem"]})
    refused(await http.get(url + no_expiry), 401, "invalid_token")
    unsigned = jwt.encode({"aud": AUDIENCE, "exp": int(time.time()) + 60, "tags": ["poem"]}, None, algorithm="none")
    refused(await http.get(url + unsigned), 401, "invalid_token")
    # an API key is never taken from the URL (URLs end up in logs)
    refused(await http.get(url + KEY), 401, "invalid_token")
    assert await status_of(http, url + forged({"exp": int(time.time()) + 60, "tags": ["poem"]})) == 200


async def test_bad_requests_get_one_json_line(gateway: str, http: httpx2.AsyncClient) -> None:
    key = bearer(KEY)
    refused(await http.post(f"{gateway}/jobs", content=b"{not json", headers=key), 422, "invalid_request")
    refused(await http.post(f"{gateway}/jobs", json=[1], headers=key), 422, "invalid_request")
    refused(await http.post(f"{gateway}/jobs", json={"graph": "bad graph!"}, headers=key), 422, "invalid_request")
    refused(await http.post(f"{gateway}/jobs", json={**JOB, "job_id": "a/b"}, headers=key), 422, "invalid_request")
    refused(await http.get(f"{gateway}/jobs/a%20b/events", headers=key), 400, "invalid_name")
    refused(await http.get(f"{gateway}/tags/a%7Bb%7D/events", headers=key), 400, "invalid_name")
    refused(await http.get(f"{gateway}/tags/poem/events?since=yesterday", headers=key), 400, "invalid_cursor")
    refused(await http.get(f"{gateway}/tags/poem/events?tag=joke&since=1-0", headers=key), 400, "invalid_cursor")
    assert "token" in refused(
        await http.get(f"{gateway}/tags/poem/events?type=tokens", headers=key), 400, "invalid_request"
    )
    refused(await http.get(f"{gateway}/jobs/never-enqueued", headers=key), 404, "not_found")
    refused(await http.get(f"{gateway}/jobs/never-enqueued/events", headers=key), 404, "not_found")
    resumed = {**key, "Last-Event-ID": "1-0"}  # a job whose stream expired: EventSource stops on a 404
    refused(await http.get(f"{gateway}/jobs/never-enqueued/events", headers=resumed), 404, "not_found")
    refused(await http.delete(f"{gateway}/jobs/never-enqueued", headers=key), 404, "not_found")
    refused(await http.get(f"{gateway}/no/such/path"), 404, "http_error")
    queued = (await http.post(f"{gateway}/jobs", json=JOB, headers=key)).json()
    assert (await http.get(f"{gateway}/jobs/{queued['job_id']}", headers=key)).json()["status"] == "queued"


async def test_a_graph_no_live_worker_serves_is_refused_naming_the_served_ones(
    gateway: str, http: httpx2.AsyncClient, settings: Settings, redis: Redis
) -> None:
    key = bearer(KEY)
    # no live worker: nothing to check against, the job waits in the queue for one
    assert (await http.post(f"{gateway}/jobs", json={**JOB, "graph": "later"}, headers=key)).status_code == 201
    await redis.hset(settings.keys.workers, "w1", worker_record(settings, "w1", graphs=("joke_poem",), seen_ago_ms=0))
    unknown = await http.post(f"{gateway}/jobs", json={**JOB, "graph": "nosuch"}, headers=key)
    detail = refused(unknown, 422, "unknown_graph")
    assert detail == f"unknown graph 'nosuch'; the live workers of queue {settings.queue_name} serve: joke_poem"
    assert (await http.post(f"{gateway}/jobs", json=JOB, headers=key)).status_code == 201
    assert await redis.zcard(settings.queue_name) == 2  # the refused one was not queued


async def test_without_keys_only_loopback_clients_are_served(settings: Settings) -> None:
    """The middleware answers before the application runs: an ASGI call with another address."""
    app = create_app(settings, GatewaySettings())
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    for client, expected in ((("203.0.113.9", 4000), 403), (("::ffff:10.0.0.1", 4000), 403), (None, 403)):
        sent.clear()
        scope = {
            "type": "http", "method": "GET", "path": "/healthz", "raw_path": b"/healthz", "query_string": b"",
            "headers": [], "client": client, "server": ("127.0.0.1", 8000), "scheme": "http",
            "http_version": "1.1", "root_path": "", "asgi": {"version": "3.0"},
        }  # fmt: skip
        await app(scope, receive, send)
        assert sent[0]["status"] == expected, client
        assert b"loopback" in sent[1]["body"]


async def test_serve_mistakes_are_one_line_and_exit_2(settings: Settings) -> None:
    env = settings_env(settings)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = await Process.start("serve", "--port", str(port), env=env)
        assert await busy.wait() == 2
    [line] = busy.stderr
    assert line.startswith(f"tokenbus: cannot listen on 127.0.0.1:{port}: {os.strerror(errno.EADDRINUSE)}"), line
    bad = await Process.start("serve", env={**env, "TOKENBUS_GATEWAY_WINDOW": "3", "TOKENBUS_GATEWAY_TOKEN_TTL": "x"})
    assert await bad.wait() == 2
    [line] = bad.stderr
    assert line.startswith("tokenbus: bad gateway configuration: ") and "TOKENBUS_GATEWAY_WINDOW" in line
    assert "TOKENBUS_GATEWAY_TOKEN_TTL" in line


async def test_a_job_id_makes_enqueueing_idempotent(
    gateway: str, http: httpx2.AsyncClient, redis: Redis, settings: Settings
) -> None:
    body = {**JOB, "job_id": "order-42"}
    first = await http.post(f"{gateway}/jobs", json=body, headers=bearer(KEY))
    second = await http.post(f"{gateway}/jobs", json=body, headers=bearer(KEY))
    assert first.json()["job_id"] == second.json()["job_id"] == "order-42"
    assert await redis.zcard(settings.queue_name) == 1


async def test_gateways_sharing_keys_share_their_clients(
    settings: Settings, http: httpx2.AsyncClient, redis: Redis
) -> None:
    """Behind a load balancer: a token one gateway handed out is good at another with the same keys
    (no secret configured: both derive it from the keys), not at one with other keys; and a stream
    cut at one resumes at the other."""
    ports = [free_port(), free_port(), free_port()]
    keys = {"TOKENBUS_GATEWAY_API_KEYS": f"{KEY},other-key"}
    gateways = [await start_gateway(settings, port, **keys) for port in ports[:2]]
    gateways.append(await start_gateway(settings, ports[2], TOKENBUS_GATEWAY_API_KEYS="a-different-key"))
    url_a, url_b, url_other = (f"http://127.0.0.1:{port}" for port in ports)
    try:
        job = (await http.post(f"{url_a}/jobs", json=JOB, headers=bearer(KEY))).json()
        job_id, token = job["job_id"], job["token"]
        assert (await http.get(f"{url_b}/jobs/{job_id}?token={token}")).json()["status"] == "queued"
        refused(await http.get(f"{url_other}/jobs/{job_id}?token={token}"), 401, "invalid_token")

        stream = settings.keys.job(job_id)  # the job's entries, as a worker would write them
        await write(redis, stream, entry(EntryType.START, job_id, 0), *(tok(job_id, s, f"{s} ") for s in (1, 2, 3)))
        first: list[Event] = []
        async with http.stream("GET", f"{url_a}/jobs/{job_id}/events?token={token}") as response:
            async for event in events(response):
                first.append(event)
                if sum(e.id is not None for e in first) == 2:
                    break
        await write(redis, stream, tok(job_id, 4, "4 "), entry(EntryType.END, job_id, 5))
        last_id = [e.id for e in first if e.id][-1] or ""
        rest: list[Event] = []
        async with http.stream(
            "GET", f"{url_b}/jobs/{job_id}/events?token={token}", headers={"Last-Event-ID": last_id}
        ) as response:
            rest = [event async for event in events(response)]
        seqs = [e.json["seq"] for e in [*first, *rest] if e.id is not None]
        assert seqs == [0, 1, 2, 3, 4, 5]
    finally:
        for gateway in gateways:
            await stop_gateway(gateway)
