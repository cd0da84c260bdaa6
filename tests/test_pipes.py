"""Output that pipes: JSON lines that are all JSON, a reader that stops reading (``| head``),
concurrent jobs that stay readable in text, and ``tail --group`` with its filters."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import orjson
from redis.asyncio import Redis

from tests.conftest import RunWorker
from tests.support import POEM, TOKENBUS, Process, entry, settings_env, token, write
from tokenbus.schemas.entries import EntryType
from tokenbus.worker.settings import Settings


async def test_enqueue_follow_jsonl_prints_only_json_lines(settings: Settings, run_burst_worker: RunWorker) -> None:
    enqueue = await Process.start(
        "enqueue", "joke_poem", "--input", '{"topic": "cats"}', "--job-id", "job-in-jsonl", "--follow",
        "--format", "jsonl", env=settings_env(settings),
    )  # fmt: skip
    await enqueue.wait_line('"type":"enqueued"', stream="stdout")
    await run_burst_worker()
    assert await enqueue.wait() == 0, enqueue.output
    lines = [orjson.loads(line) for line in enqueue.stdout]  # every line, the first too
    assert lines[0] == {"type": "enqueued", "job": "job-in-jsonl"}
    assert [e["type"] for e in lines[1:]][:: len(lines) - 2] == ["start", "end"]
    assert "".join(e["content"] for e in lines if e["type"] == "token" and e["tags"] == ["poem"]) == POEM


async def test_a_reader_that_stops_reading_ends_tail_quietly(settings: Settings, redis: Redis) -> None:
    """``tokenbus tail ... | head -1``: once head has gone, the next write ends tail, with no
    traceback and no 'Exception ignored' (exit status 141, as for a process killed by SIGPIPE)."""
    key = settings.keys.job("j")
    await write(redis, key, entry(EntryType.START, "j", 0), token("j", 1, "first "))
    read_end, write_end = os.pipe()
    tail = await asyncio.create_subprocess_exec(
        TOKENBUS, "tail", "--job", "j", "--from-start", "--format", "jsonl", env=settings_env(settings),
        stdin=asyncio.subprocess.DEVNULL, stdout=write_end, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    os.close(write_end)
    with os.fdopen(read_end, "rb") as head:  # head -1
        first = await asyncio.to_thread(head.readline)
    assert b'"type":"start"' in first
    deadline = time.monotonic() + 30
    seq = 2
    while tail.returncode is None:  # the job goes on streaming; tail's next write finds the pipe closed
        assert time.monotonic() < deadline, "tail did not end after its reader went away"
        await write(redis, key, token("j", seq, "more "))
        seq += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tail.wait(), timeout=0.1)
    assert tail.stderr is not None
    stderr = (await tail.stderr.read()).decode()
    assert (tail.returncode, stderr.splitlines()) == (141, [f"[tokenbus] following {key} after 0-0"])


async def test_concurrent_jobs_in_a_tag_stream_get_a_line_per_run_of_tokens(settings: Settings, redis: Redis) -> None:
    """Two jobs streaming the same poem at once interleaved into 'InIn sunlit sunlit'."""
    key = settings.keys.tag("poem")
    await write(
        redis, key,
        token("job-a", 1, "In"), token("job-b", 1, "In"), token("job-a", 2, " sunlit\nfields"),
        token("job-b", 2, " sunlit"), token("job-b", 3, " glade"), entry(EntryType.END, "job-a", 3),
        token("a-job-with-a-long-id", 1, "Hi"), entry(EntryType.END, "job-b", 4),
        entry(EntryType.END, "a-job-with-a-long-id", 2),
    )  # fmt: skip
    tail = await Process.start("tail", "--tag", "poem", "--from-start", env=settings_env(settings))
    await tail.wait_line("job a-job-with-a-long-id: attempt 1 end")
    await tail.stop()
    assert tail.stdout == [
        "[job-a] In",
        "[job-b] In",
        "[job-a]  sunlit",
        "[job-a] fields",
        "[job-b]  sunlit glade",
        "[…-long-id] Hi",
    ], tail.output


async def test_one_job_followed_in_two_tags_is_labelled_by_tag(settings: Settings, redis: Redis) -> None:
    await write(redis, settings.keys.tag("joke"), token("j", 1, "Why", tag="joke"), entry(EntryType.END, "j", 3))
    await write(redis, settings.keys.tag("poem"), token("j", 2, "In", tag="poem"), entry(EntryType.END, "j", 3))
    tail = await Process.start(
        "tail", "--tag", "joke", "--tag", "poem", "--job", "j", "--until-final", "--from-start",
        env=settings_env(settings),
    )  # fmt: skip
    assert await tail.wait() == 0, tail.output
    assert sorted(tail.stdout) == ["[j joke] Why", "[j poem] In"], tail.output


async def test_one_job_followed_alone_is_written_as_it_comes(settings: Settings, redis: Redis) -> None:
    await write(redis, settings.keys.job("j"), entry(EntryType.START, "j", 0), token("j", 1, "In"),
                token("j", 2, " sunlit"), entry(EntryType.END, "j", 3))  # fmt: skip
    tail = await Process.start("tail", "--job", "j", "--from-start", env=settings_env(settings))
    assert await tail.wait() == 0, tail.output
    assert tail.stdout == ["In sunlit"]


async def test_tail_through_a_group_honours_job_node_type_and_until_final(settings: Settings, redis: Redis) -> None:
    key = settings.keys.tag("poem")
    await write(
        redis, key,
        token("other", 1, "not this job "), token("j", 1, "yes ", node="a"), token("j", 2, "not this node ", node="b"),
        entry(EntryType.CUSTOM, "j", 3, node="a", content="not this type ", tags=("poem",)),
        token("j", 4, "again", node="a"), entry(EntryType.END, "j", 5), token("other", 2, "after the end"),
    )  # fmt: skip
    tail = await Process.start(
        "tail", "--tag", "poem", "--group", "g", "--consumer", "c", "--from-start", "--job", "j", "--node", "a",
        "--type", "token", "--until-final", "--format", "jsonl", env=settings_env(settings),
    )  # fmt: skip
    assert await tail.wait() == 0, tail.output  # exits by itself once j has ended
    printed = [orjson.loads(line) for line in tail.stdout]
    assert [(e["job"], e["node"], e["type"], e["content"]) for e in printed] == [
        ("j", "a", "token", "yes "),
        ("j", "a", "token", "again"),
    ]
