"""ACL roles (``tokenbus acl``) on a real redis-server: the rules are printed by the CLI and piped
into ``redis-cli``; each role's user then does its part end to end with not one refusal in Redis's
ACL log, and is refused what it has no business doing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx2
import pytest
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from tests.conftest import RunWorker
from tests.sse import free_port
from tests.support import JOKE, POEM, Process, follow_job, read_stream, settings_env, wait_for, wait_until
from tokenbus.consumer.groups import GroupConsumer
from tokenbus.consumer.jobs import job_result
from tokenbus.consumer.subscribe import subscribe
from tokenbus.redis_server import RedisServerProcess
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.schemas.keys import wake_channel
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.emitter import StreamLimits
from tokenbus.worker.orphans import Sweeper
from tokenbus.worker.settings import Settings

ADMIN_ONLY: list[tuple[Any, ...]] = [
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("CONFIG", "GET", "*"),
    ("KEYS", "*"),
    ("SCAN", "0"),
    ("ACL", "LIST"),
    ("ACL", "SETUSER", "intruder", "on", "nopass", "+@all", "~*"),
    ("CLIENT", "LIST"),
    ("EVAL", "return 1", "0"),
]


async def create_user(settings: Settings, role: str, *args: str) -> Settings:
    """``tokenbus acl ROLE`` piped into ``redis-cli``; the settings of a client of that user."""
    user = f"{settings.prefix}-{role}"
    acl = await Process.start("acl", role, "--user", user, *args, env=settings_env(settings), name="acl")
    assert await acl.wait() == 0, acl.output
    assert len(acl.stdout) == 1 and acl.stdout[0].startswith(f"ACL SETUSER {user} reset on #"), acl.output
    [notice] = acl.stderr
    password = notice.removeprefix(f"tokenbus: password of user {user}: ")
    assert password != notice, acl.output
    cli = await asyncio.create_subprocess_exec(
        "redis-cli", "-u", settings.redis_url or "", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await cli.communicate(acl.stdout[0].encode() + b"\n")
    assert (cli.returncode, out.decode().strip()) == (0, "OK"), (out, err)
    url = urlsplit(settings.redis_url or "")
    return settings.model_copy(update={"redis_url": url._replace(netloc=f"{user}:{password}@{url.netloc}").geturl()})


def user_of(settings: Settings) -> str:
    return urlsplit(settings.redis_url or "").username or ""


@pytest.fixture
async def connect() -> AsyncIterator[Any]:
    """Redis clients of given settings (users), closed after the test."""
    clients: list[Redis] = []

    def make(settings: Settings) -> Redis:
        clients.append(Redis.from_url(settings.redis_url or "", socket_timeout=30))
        return clients[-1]

    yield make
    for client in clients:
        await client.aclose()


async def refusals(admin: Redis, settings: Settings) -> list[str]:
    """What Redis refused the user of ``settings`` (its ACL log), as ``reason context object``."""
    user = user_of(settings)
    entries = []
    for e in await admin.acl_log():
        fields = {k: v.decode() if isinstance(v, bytes) else v for k, v in e.items()}
        if fields["username"] == user:
            entries.append(f"{fields['reason']} {fields['context']} {fields['object']}")
    return entries


async def refused(redis: Redis, *command: Any) -> bool:
    try:
        await redis.execute_command(*command)
    except NoPermissionError:
        return True
    return False


async def tag_text(redis: Redis, prefix: str, tag: str, job_id: str) -> str:
    """The text of ``job_id``'s chunks in tag stream ``tag``, read from its start until the job ends."""
    text = ""
    async with asyncio.timeout(60):
        async for item in subscribe(redis, tags=[tag], prefix=prefix, start="0", block_ms=300):
            if isinstance(item, Entry) and item.job == job_id:
                text += item.content if item.is_chunk else ""
                if item.is_final:
                    return text
    raise AssertionError("the tag stream ended")


async def test_gateway_worker_and_reader_users_run_a_job_end_to_end(
    settings: Settings, redis: Redis, connect: Any
) -> None:
    """The gateway enqueues and aborts, a ``tokenbus worker`` process of the worker role runs the
    jobs, the reader of ``poem`` and the gateway read what they were given."""
    worker_settings = await create_user(settings, "worker")
    gateway_settings = await create_user(settings, "gateway")
    reader_settings = await create_user(settings, "reader", "--tag", "poem")
    gateway = connect(gateway_settings)

    async with await TokenbusClient.connect(gateway_settings) as client:
        job_id = await client.enqueue("joke_poem", {"topic": "cats"})
        assert await client.enqueue("joke_poem", {"topic": "cats"}, job_id=job_id) == job_id  # idempotent
        aborted = await client.enqueue("joke_poem", {"topic": "cats"})
        assert await client.abort(aborted)  # before any worker has seen it
    metrics_port = free_port()
    worker_env = {**settings_env(worker_settings), "TOKENBUS_METRICS_PORT": str(metrics_port)}
    worker = await Process.start("worker", env=worker_env, name="worker")
    try:
        await worker.wait_line("worker serves graphs")
        async with httpx2.AsyncClient(timeout=10) as http:  # the metrics' and health check's own queries
            assert (await http.get(f"http://127.0.0.1:{metrics_port}/healthz")).status_code == 200
            assert "\ntokenbus_queue_depth " in (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        channel = wake_channel(settings.queue_name)

        async def subscribed() -> bool:
            return dict(await redis.pubsub_numsub(channel))[channel.encode()] == 1

        await wait_for(subscribed, what="the worker user to listen for wake-ups")
        view, _ = await follow_job(gateway, settings.prefix, job_id)
        assert (view.status, view.text) == (EntryType.END, JOKE + POEM), view
        cancelled = await job_result(gateway, aborted, prefix=settings.prefix, wait=True)
        assert cancelled.status is EntryType.CANCELLED, cancelled
        assert await tag_text(gateway, settings.prefix, "joke", job_id) == JOKE
        assert await tag_text(connect(reader_settings), settings.prefix, "poem", job_id) == POEM
    finally:
        exit_code = await worker.stop()
    assert exit_code == 0 and "NOPERM" not in worker.output, worker.output
    for user in (worker_settings, gateway_settings, reader_settings):
        assert await refusals(redis, user) == [], user_of(user)


async def test_worker_user_of_a_queue_named_with_glob_characters_runs_and_sweeps_jobs(
    settings: Settings, redis: Redis, run_burst_worker: RunWorker, connect: Any
) -> None:
    """The queue's name is matched literally: its ``*``, ``?``, ``[...]``, ``\\`` and ``"`` survive
    the glob escaping and the quoting for ``redis-cli``."""
    queue = f'{settings.prefix}:q*?[x]\\"'
    settings = settings.model_copy(update={"queue_name": queue})
    worker_settings = await create_user(settings, "worker")
    async with await TokenbusClient.connect(settings) as client:
        job_id = await client.enqueue("joke_poem", {"topic": "cats"})
    await run_burst_worker(redis_url=worker_settings.redis_url, queue_name=queue)
    entries = await read_stream(redis, settings.keys.job(job_id))
    assert (entries[-1].type, "".join(e.content for e in entries if e.is_chunk)) == (EntryType.END, JOKE + POEM)

    # the sweeper's part: close an attempt whose worker vanished (see test_faults.py)
    keys, orphan = settings.keys, f"{settings.prefix}-orphan"
    await redis.xadd(keys.job(orphan), Entry(type="start", job=orphan, attempt=1, seq=0, ts=1).encode())  # type: ignore[arg-type]
    await redis.zadd(keys.running, {orphan: 0})
    limits = StreamLimits(settings.tag_maxlen, settings.job_maxlen, settings.job_ttl_s)
    worker_redis = connect(worker_settings)
    assert await Sweeper(worker_redis, keys, limits, heartbeat_s=0.1).sweep() == [orphan]
    assert await refusals(redis, worker_settings) == []

    near_miss = f'{settings.prefix}:qXYx"'  # what the pattern would match if the name were not escaped
    assert await refused(worker_redis, "ZADD", near_miss, 1, "job")
    assert await refused(worker_redis, "SET", f"{near_miss}:health-check", "1")
    assert await refused(worker_redis, "XRANGE", keys.tag("poem"), "-", "+")  # it writes tags, reads none
    assert await refused(worker_redis, "PUBLISH", wake_channel(queue), "")  # it listens, never announces


async def test_enqueuer_user_enqueues_aborts_and_follows_its_jobs_only(
    settings: Settings, redis: Redis, run_burst_worker: RunWorker, connect: Any
) -> None:
    enqueuer_settings = await create_user(settings, "enqueuer")
    async with await TokenbusClient.connect(enqueuer_settings) as client:
        job_id = await client.enqueue("joke_poem", {"topic": "cats"})
        aborted = await client.enqueue("joke_poem", {"topic": "cats"})
        assert await client.abort(aborted)
    await run_burst_worker()
    enqueuer = connect(enqueuer_settings)
    view = await job_result(enqueuer, job_id, prefix=settings.prefix, wait=True)
    assert (view.status, view.text) == (EntryType.END, JOKE + POEM)
    assert (await job_result(enqueuer, aborted, prefix=settings.prefix)).status is EntryType.CANCELLED
    assert await refusals(redis, enqueuer_settings) == []

    keys = settings.keys
    assert await refused(enqueuer, "XADD", keys.job(job_id), "*", "type", "end")
    assert await refused(enqueuer, "XADD", keys.tag("poem"), "*", "type", "end")
    assert await refused(enqueuer, "XRANGE", keys.tag("poem"), "-", "+")
    assert await refused(enqueuer, "DEL", f"arq:job:{job_id}")
    assert await refused(enqueuer, "PUBLISH", "another-channel", "")


async def test_reader_user_reads_its_tags_and_nothing_else(settings: Settings, redis: Redis, connect: Any) -> None:
    reader_settings = await create_user(settings, "reader", "--tag", "poem")
    keys, job_id = settings.keys, f"{settings.prefix}-job"
    entry = Entry(type="end", job=job_id, attempt=1, seq=0, ts=1).encode()
    for key in (keys.tag("poem"), keys.tag("joke"), keys.job(job_id)):
        await redis.xadd(key, entry)  # type: ignore[arg-type]
    reader = connect(reader_settings)
    assert [e.job for e in await read_stream(reader, keys.tag("poem"))] == [job_id]
    assert await refusals(redis, reader_settings) == []

    with pytest.raises(NoPermissionError):
        async with asyncio.timeout(30):
            async for _ in subscribe(reader, tags=["joke"], prefix=settings.prefix, start="0"):
                pass
    assert await refused(reader, "XRANGE", keys.job(job_id), "-", "+")  # a job stream holds every tag
    assert await refused(reader, "XADD", keys.tag("poem"), "*", "type", "end")  # no forged entries
    assert await refused(reader, "XGROUP", "CREATE", keys.tag("poem"), "g", "0")  # groups need --groups
    assert await refused(reader, "ZADD", settings.queue_name, 1, "job")


async def test_reader_user_with_groups_acks_and_dead_letters_but_cannot_write_entries(
    settings: Settings, redis: Redis, connect: Any, run_burst_worker: RunWorker, client: TokenbusClient
) -> None:
    reader_settings = await create_user(settings, "reader", "--tag", "poem", "--groups")
    keys = settings.keys
    await redis.xadd(keys.tag("poem"), {"not": "a tokenbus entry"})
    job_id = await client.enqueue("joke_poem", {"topic": "cats"})
    await run_burst_worker()

    reader = connect(reader_settings)
    consumer = GroupConsumer(reader, [keys.tag("poem")], "g", "c1", keys=keys, start="0", block_ms=200)
    seen: list[Entry] = []

    async def handle(entry: Entry) -> None:
        seen.append(entry)

    def done() -> bool:
        return consumer.dead == 1 and any(e.is_final for e in seen)

    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(handle, stop=stop))
    try:
        await wait_until(lambda: task.done() or done(), what="the group to read the stream")
    finally:
        stop.set()
        await task
    assert done()
    assert "".join(e.content for e in seen if e.is_chunk and e.job == job_id) == POEM
    assert await redis.xlen(keys.dead_letter) == 1
    assert (await redis.xpending(keys.tag("poem"), "g"))["pending"] == 0
    assert await refusals(redis, reader_settings) == []

    assert await refused(reader, "XADD", keys.tag("poem"), "*", "type", "end")
    assert await refused(reader, "XRANGE", keys.dead_letter, "-", "+")  # the dead-letter stream: append only
    assert await refused(reader, "XADD", keys.tag("joke"), "*", "type", "end")
    assert await refused(reader, "XDEL", keys.tag("poem"), "0-1")
    assert await refused(reader, "XTRIM", keys.tag("poem"), "MAXLEN", 0)
    assert await refused(reader, "XGROUP", "DESTROY", keys.tag("poem"), "g")


@pytest.fixture(scope="module")
def bare_server() -> Iterator[RedisServerProcess]:
    """A server of its own: if a role could run them, the commands below would wipe it."""
    server = RedisServerProcess()
    server.start()
    yield server
    server.close()


@pytest.mark.parametrize(
    "role_args", [("worker",), ("enqueuer",), ("reader", "--tag", "poem", "--groups"), ("gateway", "--groups")]
)
async def test_no_role_can_administer_list_or_flush(
    role_args: tuple[str, ...], settings: Settings, bare_server: RedisServerProcess, connect: Any
) -> None:
    user_settings = await create_user(settings.model_copy(update={"redis_url": bare_server.url}), *role_args)
    user = connect(user_settings)
    assert await user.ping()
    allowed = [command for command in ADMIN_ONLY if not await refused(user, *command)]
    if role_args[0] == "worker":  # its lease scripts: a script runs with the user's rights, checked per command
        assert allowed == [("EVAL", "return 1", "0")]
        for script, *keys in (("return redis.call('FLUSHALL')",), ("return redis.call('GET', KEYS[1])", "elsewhere")):
            with pytest.raises(ResponseError, match=r"can't run this command|no permissions to access"):
                await user.execute_command("EVAL", script, len(keys), *keys)
    else:
        assert allowed == []


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("janitor",), {}, "tokenbus: unknown role 'janitor'; roles: worker, enqueuer, reader, gateway"),
        (("reader", "--tag", "po em"), {}, "tokenbus: invalid tag 'po em': characters ' ' are not allowed"),
        (("reader",), {}, "tokenbus: the reader role needs the tags it may read"),
        (("worker", "--tag", "poem"), {}, "tokenbus: the worker role reads no tag streams"),
        (("worker", "--user", "a:b"), {}, "tokenbus: invalid user name 'a:b'"),
        (("enqueuer",), {"TOKENBUS_QUEUE": "my queue"}, "tokenbus: 'my queue' holds whitespace"),
    ],
    ids=["unknown-role", "invalid-tag", "reader-without-tags", "tag-for-worker", "bad-user", "queue-with-space"],
)
async def test_acl_mistakes_print_one_line_and_exit_2(
    args: tuple[str, ...], env: dict[str, str], settings: Settings, message: str
) -> None:
    acl = await Process.start("acl", *args, "--password", "pw", env={**settings_env(settings), **env}, name="acl")
    assert await acl.wait() == 2
    assert acl.stdout == [] and len(acl.stderr) == 1 and acl.stderr[0].startswith(message), acl.output
