"""Operating tokenbus from the command line (and the same functions of ``TokenbusClient``): live
workers and the graphs they serve, ``jobs``, ``status``, ``result``, ``cancel``, ``dead``, each
run as a real process against a private redis-server and a worker process."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import httpx2
import orjson
import pytest
from redis.asyncio import Redis

from tests.conftest import RunWorker
from tests.sse import events, free_port
from tests.support import (
    JOKE,
    POEM,
    Process,
    entry,
    settings_env,
    start_gateway,
    start_worker,
    token,
    wait_for,
    wait_until,
    worker_record,
    write,
)  # fmt: skip
from tokenbus.consumer.groups import GroupConsumer
from tokenbus.consumer.subscribe import subscribe
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.schemas.errors import UnknownGraph, UnknownJob
from tokenbus.schemas.keys import FINISHED_KEPT
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.emitter import finished_commands
from tokenbus.worker.settings import Settings
from tokenbus.worker.status import JobState


async def run(settings: Settings, *args: str, within: float = 60) -> Process:
    process = await Process.start(*args, env=settings_env(settings), name=args[0])
    await process.wait(within=within)
    return process


def jsonl(process: Process) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in process.stdout]


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[Process]:
    """A worker process with one job slot: a second job waits in the queue while the first runs."""
    process = await start_worker(settings.model_copy(update={"max_jobs": 1}))
    yield process
    assert await process.stop() == 0, process.output


# -- live workers and the graphs they serve ------------------------------------------------------------
async def test_enqueue_of_a_graph_no_live_worker_serves_fails_at_once_naming_the_served_ones(
    settings: Settings, redis: Redis, worker: Process, client: TokenbusClient
) -> None:
    enqueue = await run(settings, "enqueue", "nosuch")
    assert (enqueue.proc.returncode, enqueue.stdout) == (2, []), enqueue.output
    assert enqueue.stderr == [
        f"tokenbus: unknown graph 'nosuch'; the live workers of queue {settings.queue_name} serve: joke_poem"
    ]
    with pytest.raises(UnknownGraph, match="serve: joke_poem"):
        await client.enqueue("nosuch")
    assert await redis.zcard(settings.queue_name) == 0  # nothing was queued


async def test_a_worker_registers_what_it_serves_and_leaves_when_it_stops(settings: Settings, redis: Redis) -> None:
    await redis.hset(
        settings.keys.workers, "long-gone", worker_record(settings, "long-gone", graphs=("old",), seen_ago_ms=3_600_000)
    )
    worker = await start_worker(settings)
    try:
        listed = await run(settings, "workers", "--format", "jsonl")
        [me] = jsonl(listed)
        assert (me["name"], me["graphs"], me["queue"]) == (
            f"{socket.gethostname()}:{worker.proc.pid}",
            ["joke_poem"],
            settings.queue_name,
        )
        assert not await redis.hexists(settings.keys.workers, "long-gone")  # a dead worker's record is pruned
        text = await run(settings, "workers")
        assert text.stdout[0].split() == ["WORKER", "RUNNING", "UP", "GRAPHS"] and "joke_poem" in text.stdout[1]
    finally:
        assert await worker.stop() == 0, worker.output
    assert await redis.hlen(settings.keys.workers) == 0
    gone = await run(settings, "workers")
    assert gone.stdout == [] and "no live worker on queue" in gone.stderr[0]


async def test_enqueue_with_no_live_worker_queues_the_job_and_says_who_will_run_it(
    settings: Settings, redis: Redis
) -> None:
    dead = worker_record(settings, "dead", graphs=("other",), seen_ago_ms=60_000)
    await redis.hset(settings.keys.workers, "dead", dead)
    enqueue = await run(settings, "enqueue", "joke_poem")
    assert enqueue.proc.returncode == 0, enqueue.output
    [job_id] = enqueue.stdout
    assert await redis.zscore(settings.queue_name, job_id) is not None
    assert enqueue.stderr == [
        f"[tokenbus] no live worker on queue {settings.queue_name}: job {job_id} waits until one starts "
        "(tokenbus worker)"
    ]


async def test_follow_with_no_live_worker_says_so_after_the_wait_timeout(settings: Settings) -> None:
    enqueue = await run(settings, "enqueue", "joke_poem", "--follow", "--wait-timeout", "1")
    assert enqueue.proc.returncode == 4, enqueue.output
    [job_id] = enqueue.stdout
    assert enqueue.stderr[-1] == (
        f"[tokenbus] job {job_id}: no live worker on queue {settings.queue_name} has taken it after 1s; it stays "
        "queued: start one (tokenbus worker), or cancel it (tokenbus cancel)"
    ), enqueue.output


async def test_follow_behind_busy_workers_says_so_once_and_waits(
    settings: Settings, redis: Redis, run_burst_worker: RunWorker
) -> None:
    busy = worker_record(settings, "busy", graphs=("joke_poem",), seen_ago_ms=0)
    await redis.hset(settings.keys.workers, "busy", busy)
    enqueue = await Process.start(
        "enqueue", "joke_poem", "--input", '{"topic": "cats"}', "--mode", "messages", "--follow",
        "--wait-timeout", "0.2", env=settings_env(settings),
    )  # fmt: skip
    await enqueue.wait_line("has not started after 0.2s: 1 live workers")
    await run_burst_worker()
    assert await enqueue.wait() == 0, enqueue.output
    assert "".join(enqueue.stdout[1:]) == (JOKE + POEM).replace("\n", "")
    assert sum("has not started" in line for line in enqueue.stderr) == 1


# -- jobs, status, result, cancel -----------------------------------------------------------------------
async def test_jobs_status_result_and_cancel_on_a_queued_a_running_and_a_finished_job(
    settings: Settings, redis: Redis, worker: Process, client: TokenbusClient
) -> None:
    finished = await run(settings, "enqueue", "joke_poem", "--input", '{"topic": "cats"}', "--follow")
    assert finished.proc.returncode == 0, finished.output
    done_id = finished.stdout[0]
    running_id = await client.enqueue("joke_poem", {"topic": "stall-forever"}, modes=["custom"])

    async def streaming() -> bool:
        status = await client.status(running_id)
        return status.state is JobState.RUNNING and status.entries >= 2

    await wait_for(streaming, what="the stalled job to stream its first tokens")
    queued_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages"])  # the one slot is taken

    listing = await run(settings, "jobs", "--format", "jsonl")
    assert listing.proc.returncode == 0, listing.output
    jobs = {j["job"]: j for j in jsonl(listing)}
    assert list(jobs) == [running_id, queued_id, done_id]
    running, queued, done = jobs[running_id], jobs[queued_id], jobs[done_id]
    assert (running["state"], running["attempt"], running["graph"]) == ("running", 1, "joke_poem")
    assert running["worker"] == f"{socket.gethostname()}:{worker.proc.pid}" and running["entries"] >= 2
    assert (queued["state"], queued["attempt"], queued["worker"]) == ("queued", 0, None)
    assert (done["state"], done["graph"], done["error"]) == ("end", "joke_poem", "")
    assert done["entries"] == (await client.result(done_id)).chunks > 0
    assert "1 running, 1 queued, 1 finished kept (1 shown); 1 live worker" in listing.stderr[-1]
    table = await run(settings, "jobs")
    assert table.stdout[0].split() == ["JOB", "STATE", "GRAPH", "ATTEMPT", "WORKER", "AGE", "ENTRIES", "INFO"]
    assert [line.split()[:2] for line in table.stdout[1:]] == [
        [running_id, "running"],
        [queued_id, "queued"],
        [done_id, "end"],
    ]

    status = await run(settings, "status", running_id)
    assert status.proc.returncode == 0 and f"worker      {socket.gethostname()}:{worker.proc.pid}" in status.stdout
    so_far = await run(settings, "result", running_id)
    assert so_far.proc.returncode == 4, so_far.output  # not ended: the text so far, and a notice
    assert f"job {running_id} is running (attempt 1): this is the text so far" in so_far.stderr[-1]

    cancel = await run(settings, "cancel", running_id)
    assert (cancel.proc.returncode, cancel.stdout) == (0, [f"job {running_id}: cancelled"]), cancel.output
    again = await run(settings, "cancel", running_id)
    assert again.proc.returncode == 1 and again.stderr == [f"[tokenbus] job {running_id} has already ended: cancelled"]

    result = await run(settings, "result", queued_id, "--wait")  # runs once the slot is free
    assert result.proc.returncode == 0, result.output
    sections = "\n".join(result.stdout).split("== tag ")
    assert sorted(section.strip() for section in sections if section) == [
        f"joke\n{JOKE.strip()}",
        f"poem\n{POEM.strip()}",
    ]
    poem = await run(settings, "result", queued_id, "--tag", "poem")
    assert "\n".join(poem.stdout) == POEM.rstrip("\n")
    [as_json] = jsonl(await run(settings, "result", queued_id, "--format", "jsonl"))
    assert (as_json["status"], as_json["texts"], as_json["complete"]) == ("end", {"joke": JOKE, "poem": POEM}, True)
    cancelled = await run(settings, "result", running_id)
    assert cancelled.proc.returncode == 1 and "cancelled: the job was aborted" in cancelled.stderr[-1]
    assert (await client.result(queued_id)).texts == {"joke": JOKE, "poem": POEM}
    assert (await client.status(done_id)).state is JobState.END


async def test_a_job_redis_knows_nothing_of(settings: Settings, client: TokenbusClient) -> None:
    for command in ("status", "result", "cancel"):
        process = await run(settings, command, "nope")
        assert process.proc.returncode == 2, process.output
        assert process.stderr == [
            "tokenbus: no job 'nope': never enqueued here (check TOKENBUS_PREFIX and TOKENBUS_QUEUE), "
            "or it ended longer ago than TOKENBUS_JOB_TTL"
        ]
    with pytest.raises(UnknownJob):
        await client.status("nope")


async def test_cancel_of_a_job_no_worker_has_taken(settings: Settings, client: TokenbusClient) -> None:
    job_id = await client.enqueue("joke_poem")
    cancel = await run(settings, "cancel", job_id, "--wait", "0")
    assert cancel.stdout == [
        f"job {job_id}: cancel requested; no live worker on queue {settings.queue_name}: "
        "it ends 'cancelled' when one takes it"
    ]
    assert (await client.status(job_id)).cancel_requested


async def test_finished_jobs_keep_only_the_newest(redis: Redis, settings: Settings) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(FINISHED_KEPT + 3):
            for command in finished_commands(settings.keys, f"job-{n}", n):
                pipe.execute_command(*command)
        await pipe.execute()
    kept = await redis.zrange(settings.keys.finished, 0, -1)
    assert (len(kept), kept[0], kept[-1]) == (FINISHED_KEPT, b"job-3", f"job-{FINISHED_KEPT + 2}".encode())


# -- dead letters ----------------------------------------------------------------------------------------
def hopeless_record(stream: str, group: str) -> dict[str, str]:
    """A dead letter that is no tokenbus entry."""
    return {"garbage": "1", "dead_stream": stream, "dead_id": "1-1", "dead_group": group,
            "dead_reason": "not a tokenbus entry"}  # fmt: skip


async def _dead_letter_one(redis: Redis, settings: Settings) -> str:
    """A group ``billing`` whose handler fails on the poem's first token until it is dead-lettered."""
    key = settings.keys.tag("poem")
    await write(redis, key, token("j", 1, "poison "), token("j", 2, "fine "))
    consumer = GroupConsumer(
        redis, [key], "billing", "c1", keys=settings.keys, start="0", claim_idle_ms=20, max_deliveries=2, block_ms=20
    )

    async def fails_on_poison(e: Entry) -> None:
        if e.content == "poison ":
            raise RuntimeError("the billing service is down")

    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(fails_on_poison, stop=stop))
    await wait_until(lambda: consumer.dead == 1, what="the poison entry to be dead-lettered")
    stop.set()
    await task
    [(dead_id, _)] = await redis.xrange(settings.keys.dead_letter)
    return dead_id.decode()


async def test_dead_letters_are_listed_shown_and_handed_back_to_their_group_only(
    settings: Settings, redis: Redis, client: TokenbusClient
) -> None:
    key = settings.keys.tag("poem")
    await redis.xgroup_create(key, "audit", id="0", mkstream=True)  # another group of the same stream
    dead_id = await _dead_letter_one(redis, settings)
    await redis.xadd(settings.keys.dead_letter, hopeless_record(key, "billing"))

    listed = await run(settings, "dead")
    assert listed.stdout[0].split() == ["ID", "GROUP", "STREAM", "JOB", "TYPE", "REASON"]
    assert listed.stdout[2].split()[:5] == [dead_id, "billing", key, "j", "token"]
    assert "delivered 2 times without success" in listed.stdout[2]
    [shown] = jsonl(await run(settings, "dead", "show", dead_id))
    assert (shown["group"], shown["stream"], shown["fields"]["content"]) == ("billing", key, "poison ")
    assert [d.id for d in await client.dead_letters(group="billing")][1:] == [dead_id]

    [(last_id, _)] = await redis.xrevrange(key, count=1)
    before = last_id.decode()  # a reader from here has seen nothing of job j
    redrive = await run(settings, "dead", "redrive", "--all")
    assert redrive.proc.returncode == 0, redrive.output
    [line] = redrive.stdout
    assert line.startswith(f"{dead_id} -> {key} ") and line.endswith("(group billing)")
    assert "left 1 dead letters that are no tokenbus entries" in redrive.stderr[0]
    assert [d.group for d in await client.dead_letters()] == ["billing"]  # only the hopeless one is left
    await write(redis, key, token("k", 1, "after "))

    async def handled_by(group: str) -> list[str]:
        seen: list[str] = []
        consumer = GroupConsumer(redis, [key], group, "c2", keys=settings.keys, block_ms=20)
        stop = asyncio.Event()

        async def handle(e: Entry) -> None:
            seen.append(e.content)
            if e.job == "k":
                stop.set()

        await asyncio.wait_for(consumer.run(handle, stop=stop), 30)
        return seen

    assert await handled_by("billing") == ["poison ", "after "]  # handed back to billing ...
    assert await handled_by("audit") == ["poison ", "fine ", "after "]  # ... not to the other group (once each)
    read = []  # a reader that starts after the job's entries, so nothing of it is seen before
    async with aclosing(subscribe(redis, tags=["poem"], prefix=settings.prefix, start=before, block_ms=100)) as items:
        async for item in items:
            assert isinstance(item, Entry)
            read.append(item.content)
            if item.job == "k":
                break
    assert read == ["after "]  # the handed-back copy is not new output


async def test_a_dead_letter_handed_back_is_no_news_to_a_live_gateway_client(
    settings: Settings, redis: Redis, client: TokenbusClient
) -> None:
    dead_id = await _dead_letter_one(redis, settings)
    port = free_port()
    gateway = await start_gateway(settings, port, TOKENBUS_GATEWAY_HEARTBEAT="0.2")
    contents: list[str] = []
    try:
        url = f"http://127.0.0.1:{port}/tags/poem/events"
        async with (
            httpx2.AsyncClient(timeout=httpx2.Timeout(30, connect=10)) as http,
            http.stream("GET", url) as response,
        ):
            async for event in events(response):
                if not event.data:  # a heartbeat: the live tail is on
                    if not contents:
                        await client.redrive([dead_id])
                        await write(redis, settings.keys.tag("poem"), token("k", 1, "after "))
                        contents.append("")
                    continue
                contents.append(event.json["content"])
                if event.json["job"] == "k":
                    break
    finally:
        await gateway.stop()
    assert contents == ["", "after "]


async def test_dead_letters_that_cannot_be_handed_back(settings: Settings, redis: Redis) -> None:
    hopeless = (await redis.xadd(settings.keys.dead_letter, hopeless_record("s", "g"))).decode()
    for args, needle in [
        (("dead", "redrive", hopeless), f"dead letter {hopeless} is no tokenbus entry"),
        (("dead", "redrive", "1-1"), "no dead letter 1-1"),
        (("dead", "show", "not-an-id"), "no dead letter not-an-id"),
        (("dead", "redrive"), "give the ids of the dead letters"),
    ]:
        process = await run(settings, *args)
        assert process.proc.returncode == 2 and len(process.stderr) == 1 and needle in process.stderr[0], process.output
    assert await redis.xlen(settings.keys.dead_letter) == 1


async def test_a_terminal_entry_and_start_name_the_graph_after_arq_forgets_the_job(
    settings: Settings, redis: Redis, client: TokenbusClient
) -> None:
    """A finished job's envelope is gone: its graph comes from its start entry."""
    await write(redis, settings.keys.job("old"), entry(EntryType.START, "old", 0, data={"graph": "g"}),
                entry(EntryType.END, "old", 1))  # fmt: skip
    status = await client.status("old")
    assert (status.state, status.graph, status.attempt, status.entries) == (JobState.END, "g", 1, 0)


async def test_a_worker_whose_user_predates_the_operators_keys_runs_jobs_all_the_same(
    settings: Settings, redis: Redis, redis_server: Any, client: TokenbusClient, run_burst_worker: RunWorker
) -> None:
    """A worker user made before ``<prefix>:workers`` and ``<prefix>:finished`` existed may not
    write them: the worker is unlisted and the job unindexed, but the job ends well, once."""
    user = f"{settings.prefix}-old-worker"
    await redis.execute_command(
        "ACL", "SETUSER", user, "on", ">pw", "allkeys", "allchannels", "+@all", "-hset", "-zremrangebyrank"
    )
    try:
        job_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["messages"])
        await run_burst_worker(redis_url=f"redis://{user}:pw@127.0.0.1:{redis_server.port}/0")
    finally:
        await redis.execute_command("ACL", "DELUSER", user)
    view = await client.result(job_id)
    assert (view.status, view.text) == (EntryType.END, JOKE + POEM)
    entries = await redis.xrange(settings.keys.job(job_id))
    assert [f[b"type"] for _, f in entries].count(b"end") == 1
