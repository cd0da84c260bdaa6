"""Worker logs: ``--log-format json`` (one object per line, naming the job), no user input at INFO
and above (arq would log the start of each job's request), model HTTP requests at DEBUG only."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from tests.support import Process, follow_job, settings_env
from tokenbus.schemas.entries import EntryType
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.settings import Settings

pytestmark = pytest.mark.e2e


async def run_one_job(settings: Settings, client: TokenbusClient, redis: Redis, *options: str) -> tuple[str, str, Any]:
    """A worker with ``options`` runs one joke_poem job about a topic seen nowhere else; its id,
    the topic and the worker's log lines, parsed."""
    topic = f"zebra{uuid.uuid4().hex[:12]}"
    worker = await Process.start(*options, "worker", env=settings_env(settings), name="worker")
    try:
        await worker.wait_line("worker serves graphs")
        job_id = await client.enqueue("joke_poem", {"topic": topic}, modes=["messages"])
        view, _ = await follow_job(redis, settings.prefix, job_id)
        assert view.status is EntryType.END, view
        await worker.wait_line(f"job {job_id} attempt 1: end")
    finally:
        assert await worker.stop() == 0, worker.output
    assert worker.stderr, worker.output
    return job_id, topic, [orjson.loads(line) for line in worker.stderr]  # every line is one JSON object


async def test_json_lines_name_the_job_and_never_its_input(
    settings: Settings, client: TokenbusClient, redis: Redis
) -> None:
    job_id, topic, lines = await run_one_job(settings, client, redis, "--log-format", "json")
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)
    ended = [line for line in lines if line["message"].startswith(f"job {job_id} attempt 1: end")]
    assert [(e["job_id"], e["attempt"], e["graph"]) for e in ended] == [(job_id, 1, "joke_poem")]
    started = [line for line in lines if line["logger"] == "arq.worker" and "→" in line["message"]]
    assert len(started) == 1 and started[0]["job_id"] == job_id, started  # arq's own line, tagged too
    assert "graph=joke_poem, input redacted" in started[0]["message"]
    assert [line for line in lines if topic in orjson.dumps(line).decode()] == []
    assert not any("HTTP Request" in line["message"] for line in lines)  # INFO: model requests are DEBUG


async def test_model_requests_are_debug_lines_and_input_stays_out_of_info(
    settings: Settings, client: TokenbusClient, redis: Redis
) -> None:
    _, topic, lines = await run_one_job(settings, client, redis, "--log-level", "DEBUG", "--log-format", "json")
    requests = [line for line in lines if line["message"].startswith("HTTP Request: POST")]
    assert requests and {(r["logger"], r["level"]) for r in requests} == {("httpx2", "DEBUG")}
    loud = [line for line in lines if line["level"] not in ("DEBUG",)]
    assert loud and [line for line in loud if topic in orjson.dumps(line).decode()] == []
