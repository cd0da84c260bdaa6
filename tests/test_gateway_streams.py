"""The gateway's SSE streams against entries written straight into Redis: restarts, gaps, copies
of multi-tag chunks, heartbeats and a client that stops reading. No worker: each test writes
exactly the stream it needs."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest
from redis.asyncio import Redis

from tests.conftest import STREAMS
from tests.sse import Event, events, free_port
from tests.support import Process, entry, start_gateway, token, wait_for, write
from tests.test_gateway import stop_gateway
from tokenbus.schemas.entries import EntryType
from tokenbus.schemas.keys import StreamKeys
from tokenbus.worker.redis_client import StreamsRedis
from tokenbus.worker.settings import Settings

pytestmark = pytest.mark.e2e


@pytest.fixture
def keys(settings: Settings) -> StreamKeys:
    return settings.keys


@pytest.fixture
async def gateway_process(settings: Settings) -> AsyncIterator[tuple[Process, str]]:
    port = free_port()
    process = await start_gateway(settings, port, TOKENBUS_GATEWAY_HEARTBEAT="0.2", TOKENBUS_GATEWAY_WINDOW="64")
    yield process, f"http://127.0.0.1:{port}"
    await stop_gateway(process)


@pytest.fixture
def gateway(gateway_process: tuple[Process, str]) -> str:
    return gateway_process[1]


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(30, connect=10)) as client:
        yield client


class Follower:
    """One SSE response read in the background; its events as they come."""

    def __init__(self, http: httpx2.AsyncClient, url: str, headers: dict[str, str] | None = None) -> None:
        self.events: list[Event] = []
        self.status: int | None = None
        self.ended = False
        self._started = asyncio.Event()
        self._task = asyncio.create_task(self._run(http, url, headers or {}))

    async def _run(self, http: httpx2.AsyncClient, url: str, headers: dict[str, str]) -> None:
        async with http.stream("GET", url, headers=headers) as response:
            self.status = response.status_code
            self._started.set()
            async for event in events(response):
                self.events.append(event)
        self.ended = True

    async def started(self) -> Follower:
        """Once the response has begun: the streams are followed from here on."""
        await asyncio.wait_for(self._started.wait(), 30)
        await wait_for(lambda: _now(bool(self.events)), what="the response's first bytes")
        return self

    def entries(self) -> list[dict[str, Any]]:
        return [e.json for e in self.events if e.id is not None]

    def data_events(self) -> list[Event]:
        return [e for e in self.events if e.data]

    def kinds(self) -> list[str]:
        return [e.event for e in self.data_events()]

    async def until(self, predicate: Any, what: str) -> None:
        await wait_for(lambda: _now(predicate(self)), what=what)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def _now(value: Any) -> Any:
    return value


@pytest.fixture
async def follow(http: httpx2.AsyncClient) -> AsyncIterator[Any]:
    """Start followers; each is closed (and its task awaited) when the test ends."""
    followers: list[Follower] = []

    async def start(url: str, headers: dict[str, str] | None = None) -> Follower:
        follower = Follower(http, url, headers)
        followers.append(follower)
        return await follower.started()

    yield start
    for follower in followers:
        await follower.close()


async def test_a_newer_attempt_is_announced_and_the_old_one_never_comes_back(
    gateway: str, follow: Any, redis: Redis, keys: StreamKeys
) -> None:
    stream = keys.job("j1")
    await write(redis, stream, entry(EntryType.START, "j1", 0), token("j1", 1, "old "))
    live = await follow(f"{gateway}/jobs/j1/events")
    await live.until(lambda f: len(f.entries()) == 2, "attempt 1")
    # attempt 2 starts; a late entry of the killed attempt 1 lands after its start
    ids = await write(
        redis, stream, entry(EntryType.START, "j1", 0, attempt=2), token("j1", 2, "late ", attempt=1),
        token("j1", 1, "new", attempt=2),
    )  # fmt: skip
    await live.until(lambda f: "token" in f.kinds()[3:], "attempt 2's token")
    assert live.kinds() == ["start", "token", "restart", "start", "token"]
    assert live.data_events()[2].json == {"type": "restart", "job": "j1", "attempt": 2, "previous_attempt": 1}

    # resumed from attempt 2's start: the late attempt-1 entry after it is not passed on
    resumed = await follow(f"{gateway}/jobs/j1/events", {"Last-Event-ID": ids[0]})
    await write(redis, stream, entry(EntryType.END, "j1", 2, attempt=2))
    await resumed.until(lambda f: f.ended, "the end")
    await live.until(lambda f: f.ended, "the end")
    assert [(e["attempt"], e["seq"]) for e in resumed.entries()] == [(2, 1), (2, 2)]
    # a replay from the start shows the newest attempt only
    replay = await follow(f"{gateway}/jobs/j1/events")
    await replay.until(lambda f: f.ended, "the end")
    assert [(e["attempt"], e["type"]) for e in replay.entries()] == [(2, "start"), (2, "token"), (2, "end")]
    assert "restart" not in replay.kinds()


async def test_a_trimmed_resume_point_is_a_gap_event(gateway: str, follow: Any, redis: Redis, keys: StreamKeys) -> None:
    stream = keys.tag("poem")
    first = await write(redis, stream, *(token("j2", seq, f"{seq} ") for seq in range(1, 6)))
    await redis.xtrim(stream, maxlen=2, approximate=False)  # seq 1-3 are gone
    follower = await follow(f"{gateway}/tags/poem/events", {"Last-Event-ID": first[0]})
    await follower.until(lambda f: len(f.entries()) == 2, "the entries still held")
    gap = next(e for e in follower.events if e.event == "gap")
    assert gap.json["after"] == first[0] and gap.json["first_available"] == first[3]
    assert [e["seq"] for e in follower.entries()] == [4, 5]

    # a job replayed from its start whose first entries were trimmed: a gap, not a partial text as whole
    job_stream = keys.job("j3")
    await write(redis, job_stream, entry(EntryType.START, "j3", 0), token("j3", 1, "a"), token("j3", 2, "b"))
    await redis.xtrim(job_stream, maxlen=1, approximate=False)
    replay = await follow(f"{gateway}/jobs/j3/events")
    await replay.until(lambda f: f.entries(), "the entry still held")
    assert replay.kinds()[:2] == ["gap", "token"]


async def test_a_resumed_tail_of_several_tags_passes_no_copy_twice(
    gateway: str, follow: Any, redis: Redis, keys: StreamKeys
) -> None:
    both = entry(EntryType.TOKEN, "j4", 1, content="both", tags=("joke", "poem"))
    joke_ids = await write(redis, keys.tag("joke"), both)
    poem_ids = await write(redis, keys.tag("poem"), token("j5", 1, "other"), both)
    url = f"{gateway}/tags/joke/events?tag=poem"
    # a client that had read the joke stream's copy (and nothing of the poem stream) comes back
    follower = await follow(url, {"Last-Event-ID": f"{joke_ids[0]},0-0"})
    await follower.until(lambda f: f.entries(), "the other job's token")
    await write(redis, keys.tag("poem"), token("j5", 2, "more"))
    await follower.until(lambda f: len(f.entries()) == 2, "the next token")
    assert [(e["job"], e["content"]) for e in follower.entries()] == [("j5", "other"), ("j5", "more")]
    cursor = follower.events[-1].id
    assert cursor is not None and cursor.split(",")[0] == joke_ids[0]
    assert poem_ids[1] < cursor.split(",")[1]


@pytest.mark.parametrize("settings", STREAMS, indirect=True)  # on a Redis Cluster: the hub reads two slots
async def test_clients_of_one_entry_share_its_encoding_but_not_their_cursors(
    gateway: str, follow: Any, streams: StreamsRedis, keys: StreamKeys
) -> None:
    alone = [await follow(f"{gateway}/tags/poem/events") for _ in range(2)]
    with_joke = await follow(f"{gateway}/tags/joke/events?tag=poem")
    joke_id = (await write(streams, keys.tag("joke"), token("j7", 1, "ha", tag="joke")))[0]
    await with_joke.until(lambda f: f.entries(), "the joke")
    poem_id = (await write(streams, keys.tag("poem"), token("j8", 1, "roses")))[0]
    for follower in [*alone, with_joke]:
        await follower.until(lambda f: any(e["content"] == "roses" for e in f.entries()), "the poem's token")
    sent = [[e for e in f.events if e.id is not None][-1] for f in [*alone, with_joke]]
    assert [e.id for e in sent] == [poem_id, poem_id, f"{joke_id},{poem_id}"]
    assert sent[0].data == sent[1].data == sent[2].data and sent[0].json["content"] == "roses"


@pytest.mark.parametrize("settings", STREAMS, indirect=True)  # on a Redis Cluster: another slot (lane) than poem
async def test_a_key_that_is_not_a_stream_fails_its_followers_only(
    gateway: str, follow: Any, streams: StreamsRedis, keys: StreamKeys
) -> None:
    healthy = await follow(f"{gateway}/tags/poem/events")
    broken = await follow(f"{gateway}/tags/hostile/events")
    await streams.set(keys.tag("hostile"), "not a stream")  # while it is followed
    await broken.until(lambda f: f.ended, "the broken stream's end")
    assert broken.kinds() == ["gateway_error"] and "not a stream" in broken.data_events()[0].json["detail"]
    await write(streams, keys.tag("poem"), token("j6", 1, "still here"))
    await healthy.until(lambda f: f.entries(), "the healthy follower's entry")
    assert healthy.entries()[0]["content"] == "still here"
    async with httpx2.AsyncClient() as http:  # followed from now on: refused at once
        response = await http.get(f"{gateway}/tags/hostile/events")
    assert response.status_code == 409 and response.json()["error"] == "not_a_stream"


@pytest.mark.parametrize("settings", STREAMS, indirect=True)  # on a Redis Cluster: the hub reads two slots
async def test_entries_written_by_another_language_are_skipped_and_the_stream_goes_on(
    gateway: str, follow: Any, streams: StreamsRedis, keys: StreamKeys
) -> None:
    follower = await follow(f"{gateway}/tags/joke/events?tag=poem")
    broken = token("j9", 1, "broken JSON").encode()
    broken[b"data"] = b'{"not json'  # type: ignore[index]
    await streams.xadd(keys.tag("poem"), {"hello": "world"})  # not a tokenbus entry at all
    await streams.xadd(keys.tag("poem"), broken)  # type: ignore[arg-type]
    await streams.xadd(keys.tag("joke"), {"v": "9", "type": "token"})  # a contract this gateway does not read
    await write(streams, keys.tag("poem"), token("j9", 2, "fine"))
    await write(streams, keys.tag("joke"), token("j10", 1, "fine too", tag="joke"))
    await follower.until(lambda f: len(f.entries()) == 2, "the two good entries")
    assert sorted(e["content"] for e in follower.entries()) == ["fine", "fine too"]
    assert set(follower.kinds()) == {"token"}, follower.kinds()


async def test_an_idle_stream_gets_heartbeats(gateway: str, follow: Any) -> None:
    follower = await follow(f"{gateway}/tags/quiet/events")
    await follower.until(lambda f: sum(any("ping" in c for c in e.comments) for e in f.events) >= 2, "two pings")
    assert not follower.entries()


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_client_that_stops_reading_is_disconnected_and_costs_no_memory(
    gateway_process: tuple[Process, str], redis: Redis, keys: StreamKeys
) -> None:
    process, url = gateway_process
    port = int(url.rsplit(":", 1)[1])
    stream = keys.tag("flood")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the gateway's sends block soon
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, b"GET /tags/flood/events HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(loop.sock_recv(sock, 100), 10)
    assert head.startswith(b"HTTP/1.1 200")
    payload = "x" * 1000
    written = 0

    async def flood(n: int) -> None:
        nonlocal written
        async with redis.pipeline(transaction=False) as pipe:
            for seq in range(written, written + n):
                pipe.xadd(stream, token("flood", seq, payload, tag="flood").encode(), maxlen=5000, approximate=True)
            await pipe.execute()
        written += n

    # The client reads nothing: the kernel's socket buffers (up to a few MB), the transport's and
    # then the client's buffer (1 MiB) fill; then the gateway drops the client.
    overflowed = "did not read its events"
    while overflowed not in process.output:
        assert written < 50_000, f"no overflow after {written} entries of 1 kB:\n{process.output}"
        await flood(1000)
        with contextlib.suppress(TimeoutError):
            await process.wait_line(overflowed, within=0.5)
    rss_after_overflow = rss_kb(process.proc.pid)
    await flood(10_000)  # the client is gone: what follows costs the gateway nothing per entry
    async with httpx2.AsyncClient() as http:  # and it still serves
        assert (await http.get(f"{url}/healthz")).status_code == 200
    growth = rss_kb(process.proc.pid) - rss_after_overflow
    assert growth < 8 * 1024, f"the gateway grew by {growth} kB over 10,000 more entries"
    sock.close()


async def test_a_dropped_redis_connection_loses_and_repeats_nothing(
    gateway: str, follow: Any, redis: Redis, keys: StreamKeys
) -> None:
    stream = keys.job("j7")
    await write(redis, stream, entry(EntryType.START, "j7", 0), *(token("j7", s, f"{s} ") for s in range(1, 4)))
    follower = await follow(f"{gateway}/jobs/j7/events")
    await follower.until(lambda f: len(f.entries()) == 4, "the first entries")
    for _ in range(3):  # the hub's blocked XREAD loses its connection; entries land meanwhile

        async def blocked_readers() -> list[str]:
            return [c["id"] for c in await redis.client_list() if c.get("cmd") == "xread" and "b" in c.get("flags", "")]

        for client_id in await wait_for(blocked_readers, what="the hub's blocked XREAD"):
            await redis.client_kill_filter(_id=client_id)
        seq = len(follower.entries())
        await write(redis, stream, *(token("j7", s, f"{s} ") for s in range(seq, seq + 3)))
        await follower.until(lambda f, n=seq + 3: len(f.entries()) == n, "the entries written meanwhile")
    await write(redis, stream, entry(EntryType.END, "j7", 13))
    await follower.until(lambda f: f.ended, "the end")
    assert [e["seq"] for e in follower.entries()] == list(range(14))
    assert "gap" not in follower.kinds()


async def test_without_redis_the_gateway_runs_and_says_it_is_not_ready(settings: Settings) -> None:
    dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    port = free_port()
    process = await start_gateway(dead, port)
    try:
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            assert (await http.get("/healthz")).status_code == 200
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and "Redis" in ready.json()["detail"]
            enqueued = await http.post("/jobs", json={"graph": "joke_poem", "input": {}})
            assert enqueued.status_code == 503 and enqueued.json()["error"] == "redis_unavailable"
            events = await http.get("/tags/poem/events")
            assert events.status_code == 503
    finally:
        await stop_gateway(process)
