"""The application shell with the streams on a Redis Cluster and the queue on one Redis: the CLI's
readers, the gateway and ``tokenbus top`` read the streams where the workers write them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
import orjson
import pytest

from tests.sse import events, free_port
from tests.support import JOKE, POEM, Process, settings_env, start_gateway, start_worker
from tokenbus.redis_server import free_cluster_port
from tokenbus.worker.settings import Settings

pytestmark = pytest.mark.e2e

ON_THE_CLUSTER = pytest.mark.parametrize("settings", ["cluster"], indirect=True)


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[Process]:
    process = await start_worker(settings)
    yield process
    await process.stop()


async def run(settings: Settings, *args: str, within: float = 60) -> Process:
    process = await Process.start(*args, env=settings_env(settings), name=args[0])
    await process.wait(within=within)
    return process


def poem_text(lines: list[str]) -> str:
    entries = [orjson.loads(line) for line in lines]
    return "".join(e["content"] for e in entries if e.get("type") == "token" and "poem" in e.get("tags", ()))


@ON_THE_CLUSTER
async def test_tail_the_gateway_and_top_read_the_streams_on_the_cluster(settings: Settings, worker: Process) -> None:
    tail = await Process.start("tail", "--tag", "poem", "--format", "jsonl", env=settings_env(settings), name="tail")
    port = free_port()
    gateway = await start_gateway(settings, port)
    try:
        await tail.wait_line("following")
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(60, connect=10)) as http:
            url = f"http://127.0.0.1:{port}"
            assert (await http.get(f"{url}/readyz")).status_code == 200
            created = await http.post(f"{url}/jobs", json={"graph": "joke_poem", "input": {"topic": "cats"}})
            assert created.status_code == 201, created.text
            job: dict[str, Any] = created.json()
            got = []
            async with http.stream("GET", url + job["urls"]["events"]) as response:
                assert response.status_code == 200, await response.aread()
                got = [e.json for e in [event async for event in events(response)] if e.id is not None]
            assert [e["seq"] for e in got] == list(range(len(got))) and got[-1]["type"] == "end"
            joke = "".join(e["content"] for e in got if e["type"] == "token" and "joke" in e["tags"])
            assert (joke, poem_text([orjson.dumps(e).decode() for e in got])) == (JOKE, POEM)
            status = (await http.get(url + job["urls"]["job"])).json()
            assert status["status"] == "end" and status["texts"] == {"joke": JOKE, "poem": POEM}

        await tail.wait_line('"type":"end"', stream="stdout")
        assert poem_text(tail.stdout) == POEM

        follow = await run(settings, "enqueue", "joke_poem", "--input", '{"topic": "dogs"}', "--follow",
                           "--format", "jsonl")  # fmt: skip
        assert follow.proc.returncode == 0, follow.output
        assert poem_text(follow.stdout) == POEM

        top = await run(settings, "top", "--once", "--tag", "poem")
        assert top.proc.returncode == 0, top.output
        assert any(line.split()[:1] == ["poem"] for line in top.stdout), top.output
    finally:
        await tail.stop()
        await gateway.stop()


@ON_THE_CLUSTER
async def test_an_unreachable_streams_deployment_is_one_line_and_exit_2(settings: Settings) -> None:
    nowhere = settings.model_copy(update={"streams_url": f"redis://127.0.0.1:{free_cluster_port(set())}/0"})
    process = await run(nowhere, "jobs")
    assert process.proc.returncode == 2, process.output
    assert len(process.stderr) == 1 and "Traceback" not in process.output, process.output
    assert "TOKENBUS_STREAMS_URL" in process.stderr[0], process.output
