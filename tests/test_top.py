"""``tokenbus top``: what it gathers from a private redis-server, and the real command drawn in a
terminal (``tmux``: a fixed-size pane, keys sent, the screen captured) while a worker process
streams a paced job."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tests.support import TOKENBUS, Process, entry, settings_env, start_worker, token, wait_for, write
from tokenbus.redis_server import RedisServerProcess
from tokenbus.schemas.entries import EntryType
from tokenbus.schemas.keys import StreamKeys
from tokenbus.top_data import TopSampler, find_tag_streams
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.settings import Settings
from tokenbus.worker.status import JobState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sampler(redis: Redis, settings: Settings, clock: Clock, **options: object) -> TopSampler:
    return TopSampler(redis, keys=settings.keys, queue_name=settings.queue_name, clock=clock, **options)  # type: ignore[arg-type]


# -- what top gathers ------------------------------------------------------------------------------------
async def test_rates_of_a_running_job_and_of_a_tag_stream_trimmed_meanwhile(redis: Redis, settings: Settings) -> None:
    keys, clock = settings.keys, Clock()
    await redis.zadd(keys.running, {"job-a": 1})  # as a worker's heartbeat lists its running jobs
    await write(redis, keys.job("job-a"), entry(EntryType.START, "job-a", 0), token("job-a", 1, "x"))
    await write(redis, keys.tag("poem"), token("job-a", 1, "x"))
    top = sampler(redis, settings, clock, tags=["poem", "unwritten"])
    first = await top.sample()
    [job] = first.running
    assert (job.status.job, job.status.state, job.status.entries, job.rate) == ("job-a", JobState.RUNNING, 1, None)
    assert [(t.tag, t.info.length, t.rate) for t in first.tags] == [("poem", 1, None)]  # no stream, no row

    for seq in range(2, 12):
        await write(redis, keys.job("job-a"), token("job-a", seq, "y"))
        await write(redis, keys.tag("poem"), token("job-a", seq, "y"))
    await redis.xtrim(keys.tag("poem"), maxlen=2, approximate=False)  # MAXLEN: what was written still counts
    clock.now += 2.0
    second = await top.sample()
    assert [(j.status.entries, j.rate) for j in second.running] == [(11, 5.0)]
    assert [(t.tag, t.info.length, t.info.added, t.rate) for t in second.tags] == [("poem", 2, 11, 5.0)]

    restart = entry(EntryType.START, "job-a", 0, attempt=2), token("job-a", 1, "z", attempt=2)
    await write(redis, keys.job("job-a"), *restart)
    clock.now += 1.0
    [restarted] = (await top.sample()).running
    assert (restarted.status.attempt, restarted.rate) == (2, None)  # a new attempt counts from its own start


async def test_recent_errors_come_from_the_finished_jobs_with_their_message(redis: Redis, settings: Settings) -> None:
    keys = settings.keys
    ended = {"ok": EntryType.END, "bad-1": EntryType.ERROR, "gone": EntryType.ERROR, "bad-2": EntryType.ERROR}
    for n, (job, kind) in enumerate(ended.items()):
        values = {"error": f"{job} broke", "error_type": "model_error"} if kind is EntryType.ERROR else {}
        await write(redis, keys.job(job), entry(EntryType.START, job, 0), entry(kind, job, 1, **values))
        await redis.zadd(keys.finished, {job: 1000 + n})
    await redis.delete(keys.job("gone"))  # expired: nothing to say about it
    top = sampler(redis, settings, Clock(), tags=["none"])
    errors = (await top.sample()).errors
    assert [(e.job, e.error, e.error_type) for e in errors] == [
        ("bad-2", "bad-2 broke", "model_error"),
        ("bad-1", "bad-1 broke", "model_error"),
    ]
    await redis.delete(keys.job("bad-1"))  # a finished job's status was read once: still shown
    await redis.zrem(keys.finished, "bad-2")  # left the newest finished: not shown any more
    assert [e.job for e in (await top.sample()).errors] == ["bad-1"]


async def test_tag_streams_are_found_by_scan_and_the_newest_are_kept(redis: Redis, settings: Settings) -> None:
    keys = settings.keys
    for n, tag in enumerate(["old", "older", "newest", "newer"]):
        age = {"old": 3, "older": 4, "newest": 1, "newer": 2}[tag]
        await redis.xadd(keys.tag(tag), {"f": "v"}, id=f"{10_000 - age * 1000}-{n}")
    await redis.set(f"{keys.prefix}:tag:{{not-a-stream}}", "x")
    await redis.xadd(f"{keys.prefix}:tag:{{no spaces allowed}}", {"f": "v"})
    await redis.xadd(f"{keys.prefix}x:tag:{{other-prefix}}", {"f": "v"})
    found, complete = await find_tag_streams(redis, keys)
    assert (sorted(found.values()), complete) == (["newer", "newest", "old", "older"], True)
    snapshot = await sampler(redis, settings, Clock(), max_tags=2).sample()
    assert ([t.tag for t in snapshot.tags], snapshot.tags_found) == (["newer", "newest"], 4)
    assert not (await find_tag_streams(redis, StreamKeys(f"{keys.prefix}-none")))[0]


async def test_consumer_groups_of_the_tag_streams_shown_with_their_lag(redis: Redis, settings: Settings) -> None:
    keys = settings.keys
    await write(redis, keys.tag("poem"), *(token("j", seq, "x") for seq in range(5)))
    await redis.xgroup_create(keys.tag("poem"), "billing", id="0")
    await write(redis, keys.tag("joke"), token("j", 0, "x"))
    snapshot = await sampler(redis, settings, Clock()).sample()
    assert [(g.stream, g.group, g.pending, g.lag) for g in snapshot.groups] == [(keys.tag("poem"), "billing", 0, 5)]


# -- the real command in a terminal ---------------------------------------------------------------------
class Tmux:
    """A tmux server of the test's own (its socket in the test's directory) with one session."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / "tmux.sock"
        self.status = directory / "status"
        self.stderr = directory / "stderr"
        self._started = False

    async def tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        out, err, status = await self._run(*args, env=env)
        assert status == 0, f"tmux {' '.join(args)}: {err}"
        return out

    async def _run(self, *args: str, env: dict[str, str] | None = None) -> tuple[str, str, int | None]:
        proc = await asyncio.create_subprocess_exec(
            "tmux", "-S", str(self.socket), "-f", "/dev/null", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        return out.decode(), err.decode(), proc.returncode

    async def _start(self, env: dict[str, str]) -> None:
        """The tmux server (its environment, which its sessions get, is ``env``), with a session
        that only keeps it up: ``top`` then runs in a session of its own on a server already
        running. (A new server that tmux reported gone at its first session, 'server exited
        unexpectedly', once in a full run: that is tried again, never ``top``.)"""
        for _ in range(3):
            _, err, status = await self._run("new-session", "-d", "-s", "keep", "sleep 3600", env=env)
            if status == 0 or "server exited unexpectedly" not in err:
                break
        assert status == 0, f"tmux new-session (the server's own): {err}"

    async def top(self, settings: Settings, *args: str) -> None:
        """``tokenbus top`` in a 160x50 terminal; its exit status and stderr go to files."""
        env = settings_env(settings)
        if not self._started:
            await self._start(env)
            self._started = True
        command = f"{TOKENBUS} top {' '.join(args)} 2>{self.stderr}; echo $? >{self.status}"
        await self.tmux("new-session", "-d", "-s", "top", "-x", "160", "-y", "50", command, env=env)

    async def screen(self) -> str:
        return await self.tmux("capture-pane", "-p", "-t", "top")

    async def screen_showing(self, pattern: str, *, what: str) -> re.Match[str]:
        async def shown() -> re.Match[str] | None:
            return re.search(pattern, await self.screen(), re.MULTILINE)

        return await wait_for(shown, within=60, what=what)

    async def exit_status(self) -> int:
        async def written() -> str | None:
            return self.status.read_text().strip() if self.status.exists() else None

        return int(await wait_for(written, within=30, what="top to exit"))

    async def close(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            "tmux", "-S", str(self.socket), "kill-server", stderr=asyncio.subprocess.DEVNULL
        )  # (the keep-alive session goes with it)
        await proc.wait()


@pytest.fixture
async def terminal(tmp_path: Path) -> AsyncIterator[Tmux]:
    assert shutil.which("tmux"), "tmux is missing: ./dev test installs it with apt-get"
    tmux = Tmux(tmp_path)
    yield tmux
    await tmux.close()


@pytest.mark.e2e
async def test_top_shows_a_running_jobs_tokens_per_second_and_quits_on_q(
    settings: Settings, client: TokenbusClient, redis: Redis, terminal: Tmux
) -> None:
    # the worker's own offline model at 8 tokens/s: a job streams for several seconds
    paced = settings.model_copy(update={"openai_base_url": None, "openai_api_key": None, "offline_tokens_per_s": 8})
    worker = await start_worker(paced)
    try:
        job_id = await client.enqueue("joke_poem", {"topic": "cats"})

        async def streaming() -> bool:
            return await redis.exists(settings.keys.tag("joke"), settings.keys.tag("poem")) == 2

        await wait_for(streaming, what="the job to stream both tags")  # so that top's first search finds them
        await terminal.top(settings, "--interval", "0.5")
        row = rf"^ {job_id}\s+joke_poem\s+1\s+\S+:{worker.proc.pid}\s+\S+\s+(\d+)\s+(\d+\.\d)\s*$"
        moving = await terminal.screen_showing(
            row.replace(r"(\d+\.\d)", r"([1-9]\d*\.\d|0\.[1-9])"), what="the job's row with tokens/s above 0"
        )
        assert int(moving.group(1)) > 0, moving.group(0)
        await terminal.screen_showing(r"^ poem\s+[1-9]\d*\s+\d+\.\d\s+", what="the poem's tag stream")
        await client.cancel(job_id, timeout_s=30)
        await terminal.tmux("send-keys", "-t", "top", "q")
        assert await terminal.exit_status() == 0
        assert terminal.stderr.read_text() == ""
    finally:
        assert await worker.stop() == 0, worker.output


@pytest.mark.e2e
async def test_ctrl_c_quits_and_a_redis_that_goes_away_ends_top_in_one_line(
    own_redis: RedisServerProcess, settings: Settings, terminal: Tmux
) -> None:
    settings = settings.model_copy(update={"redis_url": own_redis.url})
    await terminal.top(settings, "--interval", "0.2")
    await terminal.screen_showing(r"^tokenbus top .* 0 live workers", what="top's first view")
    await terminal.tmux("send-keys", "-t", "top", "C-c")
    assert await terminal.exit_status() == 0
    assert terminal.stderr.read_text() == ""

    terminal.status.unlink()
    await terminal.top(settings, "--interval", "0.2")
    await terminal.screen_showing(r"^tokenbus top .* 0 live workers", what="top's first view")
    own_redis.stop()
    assert await terminal.exit_status() == 2
    [line] = terminal.stderr.read_text().splitlines()
    assert line.startswith(f"tokenbus: cannot reach Redis at {own_redis.url}"), line


async def test_once_prints_one_view_where_stdout_is_no_terminal(settings: Settings, redis: Redis) -> None:
    await write(redis, settings.keys.tag("poem"), token("j", 0, "x"))
    top = await Process.start("top", "--interval", "0.1", "--tag", "poem", env=settings_env(settings))
    assert await top.wait() == 0, top.output
    assert top.stdout[0].startswith("tokenbus top") and any(line.split()[:2] == ["poem", "1"] for line in top.stdout)
    bad = await Process.start("top", "--tag", "no spaces", env=settings_env(settings))
    assert await bad.wait() == 2 and len(bad.stderr) == 1 and "no spaces" in bad.stderr[0], bad.output
