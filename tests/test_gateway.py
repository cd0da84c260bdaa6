"""The HTTP/SSE gateway over real HTTP: a ``tokenbus serve`` process, a private redis-server, a
worker and the offline model. What a browser relies on: every token once, resumable with no gap
and no duplicate, scoped tokens, errors as JSON."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest
from redis.asyncio import Redis

from tests.conftest import make_settings
from tests.sse import Event, events, free_port
from tests.support import JOKE, POEM, Process, ThreadedModelServer, start_gateway, start_worker
from tests.test_acl import create_user, refusals
from tokenbus.redis_server import RedisServerProcess
from tokenbus.worker.settings import Settings

pytestmark = pytest.mark.e2e

KEY = "test-api-key"
SECRET = "test-token-secret"


@pytest.fixture
async def worker(paced_settings: Settings) -> AsyncIterator[Process]:
    process = await start_worker(paced_settings)
    yield process
    await process.stop()


async def gateway_for(settings: Settings, **env: str) -> tuple[Process, str]:
    port = free_port()
    return await start_gateway(settings, port, **env), f"http://127.0.0.1:{port}"


@pytest.fixture
async def gateway(paced_settings: Settings) -> AsyncIterator[str]:
    process, url = await gateway_for(paced_settings)
    yield url
    await stop_gateway(process)


async def stop_gateway(process: Process) -> None:
    """SIGTERM: uvicorn closes the open streams, shuts down, then re-raises the signal."""
    assert await process.stop() == -signal.SIGTERM, process.output
    assert "Application shutdown complete" in process.output, process.output


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(60, connect=10)) as client:
        yield client


async def enqueue(http: httpx2.AsyncClient, url: str, topic: str = "cats", **headers: str) -> dict[str, Any]:
    response = await http.post(f"{url}/jobs", json={"graph": "joke_poem", "input": {"topic": topic}}, headers=headers)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def collect(
    http: httpx2.AsyncClient, url: str, *, headers: dict[str, str] | None = None, stop_after: int | None = None
) -> tuple[list[Event], bool]:
    """The events of one SSE response, until it ends (True) or ``stop_after`` entries were read
    (False: the connection is cut there)."""
    got: list[Event] = []
    async with http.stream("GET", url, headers=headers or {}) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        async for event in events(response):
            got.append(event)
            if stop_after is not None and sum(e.id is not None for e in got) >= stop_after:
                return got, False
    return got, True


def entries(got: list[Event]) -> list[dict[str, Any]]:
    return [e.json for e in got if e.id is not None]


def text(entries: list[dict[str, Any]], tag: str) -> str:
    return "".join(e["content"] for e in entries if e["type"] == "token" and tag in e["tags"])


async def test_job_events_carry_every_token_once_then_the_end(
    worker: Process, gateway: str, http: httpx2.AsyncClient
) -> None:
    job = await enqueue(http, gateway)
    got, ended = await collect(http, gateway + job["urls"]["events"])
    assert ended, "the response ends after the terminal event"
    seen = entries(got)
    assert [e["seq"] for e in seen] == list(range(len(seen))), "each entry once, in order"
    assert seen[0]["type"] == "start" and seen[-1]["type"] == "end"
    assert got[-1].event == "end" and [e.id for e in got if e.id] == [e["id"] for e in seen]
    assert text(seen, "joke") == JOKE and text(seen, "poem") == POEM
    assert all(e.event == e.json["type"] for e in got if e.id is not None)

    status = (await http.get(gateway + job["urls"]["job"])).json()
    assert status["status"] == "end" and status["texts"] == {"joke": JOKE, "poem": POEM}
    assert status["complete"] and status["chunks"] == len(seen) - 2
    assert status["timings"]["started_ms"] <= status["timings"]["first_chunk_ms"] <= status["timings"]["ended_ms"]
    # the job has ended: a reconnect after its last event is told so (204 stops EventSource)
    again = await http.get(gateway + job["urls"]["events"], headers={"Last-Event-ID": seen[-1]["id"]})
    assert again.status_code == 204


@pytest.mark.parametrize("how", ["last-event-id", "since"])
async def test_a_cut_stream_resumes_with_no_gap_and_no_duplicate(
    worker: Process, gateway: str, http: httpx2.AsyncClient, how: str
) -> None:
    job = await enqueue(http, gateway)
    url = gateway + job["urls"]["events"]
    first, ended = await collect(http, url, stop_after=12)  # cut mid-stream: the poem is still streaming
    assert not ended
    resume_id = [e.id for e in first if e.id][-1]
    assert resume_id is not None
    if how == "since":
        rest, ended = await collect(http, f"{url}?since={resume_id}")
    else:
        rest, ended = await collect(http, url, headers={"Last-Event-ID": resume_id})
    assert ended
    seen = entries(first) + entries(rest)
    assert [e["seq"] for e in seen] == list(range(len(seen)))
    assert text(seen, "joke") == JOKE and text(seen, "poem") == POEM


async def test_a_tag_stream_sees_only_its_tag(worker: Process, gateway: str, http: httpx2.AsyncClient) -> None:
    poem: list[dict[str, Any]] = []
    following = asyncio.Event()

    async def follow() -> None:
        async with http.stream("GET", f"{gateway}/tags/poem/events") as response:
            async for event in events(response):
                following.set()  # the first bytes: the stream is followed from here on
                if event.id is not None:
                    poem.append(event.json)
                    if event.event == "end":
                        return

    task = asyncio.create_task(follow())
    await asyncio.wait_for(following.wait(), 30)
    await enqueue(http, gateway)
    await asyncio.wait_for(task, 60)
    assert text(poem, "poem") == POEM
    assert {tuple(e["tags"]) for e in poem if e["type"] == "token"} == {("poem",)}


@pytest.fixture
async def slow_worker(redis_server: RedisServerProcess, prefix: str) -> AsyncIterator[tuple[Process, Settings]]:
    """A worker on a model of 20 tokens/s: a job runs for seconds, time enough to cancel it mid-way."""
    model = ThreadedModelServer(tokens_per_s=20).start()
    settings = make_settings(redis_server.url, model.base_url, prefix)
    process = await start_worker(settings)
    yield process, settings
    await process.stop()
    model.stop()


async def test_delete_cancels_a_running_job(
    slow_worker: tuple[Process, Settings], gateway: str, http: httpx2.AsyncClient
) -> None:
    job = await enqueue(http, gateway)
    first, _ = await collect(http, gateway + job["urls"]["events"], stop_after=5)  # it streams
    cancelled = await http.delete(gateway + job["urls"]["cancel"])
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelling"
    rest, ended = await collect(http, gateway + job["urls"]["events"], headers={"Last-Event-ID": first[-1].id or ""})
    assert ended and rest[-1].event == "cancelled"
    status = (await http.get(gateway + job["urls"]["job"])).json()
    assert status["status"] == "cancelled" and len(status["texts"].get("poem", "")) < len(POEM)
    again = await http.delete(gateway + job["urls"]["cancel"])
    assert again.status_code == 409 and again.json()["error"] == "ended"


async def test_a_killed_gateway_restarted_resumes_its_clients_where_they_were(
    worker: Process, paced_settings: Settings, http: httpx2.AsyncClient
) -> None:
    process, url = await gateway_for(paced_settings)
    port = int(url.rsplit(":", 1)[1])
    job = await enqueue(http, url)
    first: list[Event] = []
    with pytest.raises(httpx2.TransportError):  # the connection dies with the gateway, mid-stream
        async with http.stream("GET", url + job["urls"]["events"]) as response:
            async for event in events(response):
                first.append(event)
                if len(entries(first)) == 8:
                    process.proc.kill()
    assert first[-1].event == "token" and await process.wait() == -signal.SIGKILL
    process = await start_gateway(paced_settings, port)
    try:
        last_id = [e.id for e in first if e.id][-1] or ""
        rest, ended = await collect(http, url + job["urls"]["events"], headers={"Last-Event-ID": last_id})
    finally:
        await stop_gateway(process)
    assert ended
    seen = entries(first) + entries(rest)
    assert [e["seq"] for e in seen] == list(range(len(seen)))
    assert text(seen, "joke") == JOKE and text(seen, "poem") == POEM


async def test_the_gateway_role_is_all_the_gateway_needs(
    worker: Process, paced_settings: Settings, http: httpx2.AsyncClient, redis: Redis
) -> None:
    """``tokenbus serve`` as a Redis user of ``tokenbus acl gateway``: enqueue, follow a job and a
    tag, status, cancel; and not one refusal in Redis's ACL log."""
    gateway_settings = await create_user(paced_settings, "gateway")
    process, url = await gateway_for(gateway_settings)
    try:
        poem = asyncio.create_task(collect(http, f"{url}/tags/poem/events", stop_after=3))
        job = await enqueue(http, url)
        got, ended = await collect(http, url + job["urls"]["events"])
        assert ended and text(entries(got), "poem") == POEM
        assert (await http.get(url + job["urls"]["job"])).json()["status"] == "end"
        tail, _ = await asyncio.wait_for(poem, 30)
        assert {e["job"] for e in entries(tail)} == {job["job_id"]}
        other = await enqueue(http, url)
        assert (await http.delete(url + other["urls"]["cancel"])).status_code == 202
        assert (await http.get(f"{url}/readyz")).status_code == 200
    finally:
        await stop_gateway(process)
    assert await refusals(redis, gateway_settings) == []


async def test_state_modes_reach_the_browser_and_the_result_is_kept(
    worker: Process, gateway: str, http: httpx2.AsyncClient
) -> None:
    body = {"graph": "joke_poem", "input": {"topic": "cats"}, "modes": ["messages", "updates", "values"]}
    job = (await http.post(f"{gateway}/jobs", json=body)).json()
    got, ended = await collect(http, gateway + job["urls"]["events"])
    assert ended
    kinds = [e.event for e in got if e.id]
    assert "update" in kinds and "values" in kinds and kinds[-1] == "end"
    updates = [e.json for e in got if e.event == "update"]
    assert all(u["tags"] == [] and u["node"] for u in updates)
    status = (await http.get(gateway + job["urls"]["job"])).json()
    assert status["updates"] == [u["node"] for u in updates]
    assert status["result"] == next(e.json for e in got if e.event == "end")["data"]["result"]
    assert status["result"] and status["state"] == [e.json for e in got if e.event == "values"][-1]["data"]
    # ?tag= keeps that tag's tokens and the job's start and end, not the state (it holds every tag's text)
    poem_only, _ = await collect(http, gateway + job["urls"]["events"] + "?tag=poem")
    assert {e.event for e in poem_only if e.id} == {"start", "token", "end"}
    assert text(entries(poem_only), "poem") == POEM and text(entries(poem_only), "joke") == ""
