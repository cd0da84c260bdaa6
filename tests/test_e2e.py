"""End to end through the command line: ``tokenbus worker``, ``enqueue`` and ``tail`` as processes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest

from tests.support import JOKE, POEM, Process, settings_env
from tokenbus.worker.settings import Settings

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    return settings_env(settings)


@pytest.fixture
async def worker(env: dict[str, str]) -> AsyncIterator[Process]:
    proc = await Process.start("worker", env=env, name="worker")
    await proc.wait_line("worker serves graphs")
    yield proc
    assert await proc.stop() == 0, proc.output


@pytest.mark.parametrize("mode", ["messages", "custom"])
async def test_tail_started_before_the_job_prints_every_poem_token_and_nothing_else(
    mode: str, env: dict[str, str], worker: Process
) -> None:
    tail = await Process.start("tail", "--tag", "poem", "--format", "jsonl", env=env, name="tail")
    await tail.wait_line("following")
    enqueue = await Process.start(
        "enqueue",
        "joke_poem",
        "--input",
        '{"topic": "cats"}',
        "--mode",
        mode,
        "--follow",
        env=env,
        name="enqueue",
    )
    assert await enqueue.wait() == 0, enqueue.output
    job_id = enqueue.stdout[0]
    assert "\n".join(enqueue.stdout[1:]).strip() == (JOKE + POEM).strip()

    await tail.wait_line('"type":"end"', stream="stdout")
    await tail.stop()
    entries = [orjson.loads(line) for line in tail.stdout]
    assert {e["job"] for e in entries} == {job_id}
    chunks = [e for e in entries if e["type"] in ("token", "custom")]
    assert all(e["tags"] == ["poem"] for e in chunks)
    assert "".join(e["content"] for e in chunks) == POEM
    assert [e["seq"] for e in entries] == sorted(e["seq"] for e in entries)
    assert chunks[0]["meta"]["langgraph_node"] == "call_model"


async def test_follow_exits_non_zero_on_error(env: dict[str, str], worker: Process) -> None:
    enqueue = await Process.start(
        "enqueue", "joke_poem", "--input", '{"topic": "explode-error"}', "--follow", env=env, name="enqueue"
    )
    assert await enqueue.wait() == 1, enqueue.output
    assert any("error: " in line and "scripted failure mid-stream" in line for line in enqueue.stderr), enqueue.output


async def test_enqueue_refuses_malformed_input_before_queueing(env: dict[str, str]) -> None:
    enqueue = await Process.start("enqueue", "joke_poem", "--input", '{"topic": ', env=env, name="enqueue")
    assert await enqueue.wait() == 2
    assert any("input is not valid JSON" in line for line in enqueue.stderr), enqueue.output
    assert enqueue.stdout == []


async def test_tail_by_job_exits_when_the_job_ends(env: dict[str, str], worker: Process) -> None:
    enqueue = await Process.start("enqueue", "joke_poem", "--input", '{"topic": "cats"}', env=env, name="enqueue")
    assert await enqueue.wait() == 0
    job_id = enqueue.stdout[0]
    tail = await Process.start("tail", "--job", job_id, "--from-start", "--sep", "|", env=env, name="tail")
    assert await tail.wait() == 0, tail.output
    text = "\n".join(tail.stdout)
    assert text.startswith("Why| was| the| cat|")
    assert any(f"job {job_id}: attempt 1 end" in line for line in tail.stderr)
