"""A corpus of mistakes and bad days, each run through the real ``tokenbus`` command: one line on
stderr that says what is wrong and what to do, exit status 2, no traceback (``--log-level
DEBUG`` shows it)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from tests.support import Process, settings_env
from tokenbus.redis_server import RedisServerProcess, free_port
from tokenbus.worker.settings import Settings

PASSWORD = "the-password"


@pytest.fixture
async def acl_user(redis: Redis, settings: Settings) -> AsyncIterator[str]:
    """An ACL user of the test's Redis with the password ``PASSWORD``."""
    user = f"{settings.prefix}-user"
    await redis.execute_command("ACL", "SETUSER", user, "on", f">{PASSWORD}", "allkeys", "allchannels", "+@all")
    yield user
    await redis.execute_command("ACL", "DELUSER", user)


@pytest.fixture(scope="module")
def password_server() -> Iterator[RedisServerProcess]:
    """A Redis whose default user needs a password."""
    server = RedisServerProcess()
    server.start()
    admin = SyncRedis(port=server.port)
    admin.config_set("requirepass", PASSWORD)
    admin.close()
    yield server
    server.close()


async def run(env: dict[str, str], *args: str) -> Process:
    process = await Process.start(*args, env=env)
    await process.wait(within=60)
    return process


def assert_one_line(process: Process, *needles: str) -> str:
    assert process.proc.returncode == 2, process.output
    assert process.stdout == [], process.output
    assert len(process.stderr) == 1, process.output
    [line] = process.stderr
    assert line.startswith("tokenbus"), line
    for needle in needles:
        assert needle in line, line
    return line


def url(server: RedisServerProcess, *, user: str = "", password: str = "", db: int = 0) -> str:
    auth = f"{user}:{password}@" if user or password else ""
    return f"redis://{auth}127.0.0.1:{server.port}/{db}"


COMMANDS = [
    ("enqueue", "joke_poem"), ("tail", "--tag", "poem"), ("groups", "--tag", "poem"), ("jobs",), ("status", "j"),
    ("dead",), ("top", "--once"),
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=[c[0] for c in COMMANDS])
async def test_redis_that_is_down(command: tuple[str, ...], settings: Settings) -> None:
    env = {**settings_env(settings), "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    process = await run(env, *command)
    assert_one_line(process, "cannot reach Redis at redis://127.0.0.1:", "Connection refused", "REDIS_URL")


@pytest.mark.parametrize("command", COMMANDS, ids=[c[0] for c in COMMANDS])
async def test_a_wrong_password_names_neither_it_nor_retries(
    command: tuple[str, ...], settings: Settings, redis_server: RedisServerProcess, acl_user: str
) -> None:
    env = {**settings_env(settings), "REDIS_URL": url(redis_server, user=acl_user, password="wrong")}
    process = await run(env, *command)
    line = assert_one_line(process, "refused the user and password of REDIS_URL", f"{acl_user}:***@")
    assert "wrong" not in line


async def test_a_worker_refused_its_password_stops_at_once_instead_of_waiting_for_redis(
    settings: Settings, redis_server: RedisServerProcess, acl_user: str
) -> None:
    """A worker waits a minute for a Redis that is not up yet (arq retries every second): not for
    credentials Redis refuses, which waiting does not mend."""
    env = {**settings_env(settings), "REDIS_URL": url(redis_server, user=acl_user, password="wrong")}
    worker = await Process.start("worker", env=env)
    assert await worker.wait(within=30) == 2, worker.output
    assert not any("retries remaining" in line for line in worker.stderr), worker.output
    assert [line for line in worker.stderr if line.startswith("tokenbus:")] == [worker.stderr[-1]]
    assert "refused the user and password" in worker.stderr[-1]


@pytest.mark.parametrize("command", [("enqueue", "joke_poem"), ("tail", "--tag", "poem")], ids=["enqueue", "tail"])
async def test_sentinels_that_are_down_or_are_not_sentinels(
    command: tuple[str, ...], settings: Settings, redis_server: RedisServerProcess
) -> None:
    down = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    env = {**settings_env(settings), "TOKENBUS_SENTINELS": down, "TOKENBUS_SENTINEL_MASTER": "queue"}
    line = assert_one_line(
        await run(env, *command), f"no Sentinel of TOKENBUS_SENTINELS={down} answered with a master named 'queue'",
        "Connection refused", "check TOKENBUS_SENTINELS and TOKENBUS_SENTINEL_MASTER",
    )  # fmt: skip
    assert "<redis" not in line  # redis-py's repr of its clients is not shown
    plain = f"127.0.0.1:{redis_server.port}"  # the Redis itself, not a Sentinel watching it
    env = {**settings_env(settings), "TOKENBUS_SENTINELS": plain}
    assert_one_line(await run(env, *command), f"TOKENBUS_SENTINELS={plain} names a Redis that is not a Sentinel")


async def test_no_password_for_a_redis_that_needs_one(settings: Settings, password_server: RedisServerProcess) -> None:
    env = {**settings_env(settings), "REDIS_URL": url(password_server)}
    assert_one_line(await run(env, "enqueue", "joke_poem"), "needs a password", "REDIS_URL")


async def test_a_password_for_a_redis_without_one(settings: Settings, redis_server: RedisServerProcess) -> None:
    env = {**settings_env(settings), "REDIS_URL": url(redis_server, password="pw")}
    assert_one_line(await run(env, "tail", "--tag", "poem"), "has no password set, but REDIS_URL gives one")


async def test_a_database_the_server_does_not_have(settings: Settings, redis_server: RedisServerProcess) -> None:
    env = {**settings_env(settings), "REDIS_URL": url(redis_server, db=99)}
    assert_one_line(await run(env, "enqueue", "joke_poem"), "no database 99", "'databases' setting")


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("http://localhost:6379", "not a Redis URL (scheme 'http')"),
        ("localhost:6379", "not a Redis URL"),
        ("redis://localhost:port/0", "not a Redis URL (Port could not be cast"),
        ("redis://localhost:6379/zero", "the database must be a number, not 'zero'"),
        ("redis://user:secret@/0", "no host"),
    ],
)
async def test_a_redis_url_that_is_not_one(value: str, needle: str, settings: Settings) -> None:
    env = {**settings_env(settings), "REDIS_URL": value}
    line = assert_one_line(await run(env, "enqueue", "joke_poem"), "REDIS_URL", needle, "redis://[user:password@]")
    assert "secret" not in line


@pytest.mark.parametrize(
    ("variable", "value", "needle"),
    [
        ("TOKENBUS_GRAPHS", '{"mine": "app.graphs:graph"', "TOKENBUS_GRAPHS is not valid JSON"),
        ("TOKENBUS_GRAPHS", '["app.graphs:graph"]', "TOKENBUS_GRAPHS=['app.graphs:graph']: Input should be"),
        ("TOKENBUS_MAX_JOBS", "many", "TOKENBUS_MAX_JOBS='many': Input should be a valid integer"),
        ("TOKENBUS_JOB_TTL", "0", "TOKENBUS_JOB_TTL='0': Input should be greater than or equal to 1"),
        ("TOKENBUS_LEASE", "1", "TOKENBUS_LEASE (1s) must be longer than TOKENBUS_HEARTBEAT (5s)"),
        ("TOKENBUS_PREFIX", "my prefix", "TOKENBUS_PREFIX='my prefix': invalid prefix"),
    ],
)
@pytest.mark.parametrize("command", [("enqueue", "joke_poem"), ("worker",)], ids=["enqueue", "worker"])
async def test_malformed_settings(
    command: tuple[str, ...], variable: str, value: str, needle: str, settings: Settings
) -> None:
    env = {**settings_env(settings), variable: value}
    assert_one_line(await run(env, *command), "bad configuration", needle, "Configuration")


async def test_a_malformed_gateway_setting(settings: Settings) -> None:
    env = {**settings_env(settings), "TOKENBUS_GATEWAY_TOKEN_TTL": "an hour", "TOKENBUS_GATEWAY_API_KEYS": "k"}
    assert_one_line(await run(env, "serve", "--port", str(free_port())), "TOKENBUS_GATEWAY_TOKEN_TTL", "valid integer")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("enqueue", "joke_poem", "--config", "[1]"), "--config must be a JSON object"),
        (("enqueue", "joke_poem", "--config", '{"a": '), "--config is not valid JSON"),
        (("enqueue", "joke_poem", "--input", "[1]"), "input must be a JSON object"),
        (("enqueue", "bad graph"), "graph"),
        (("tail", "--tag", "poem", "--type", "tokens"), "argument --type: invalid choice: 'tokens' (choose from"),
        (("tail", "--tag", "bad tag"), "invalid tag 'bad tag'"),
        (("tail",), "give --tag"),
        (("tail", "--tag", "poem", "--until-final"), "--until-final stops once the jobs of --job end"),
        (("tail", "--tag", "poem", "--group", "g"), "--group needs --consumer"),
        (("jobs", "--limit", "many"), "argument --limit: invalid int value"),
        (("jobs", "--limit", "0"), "--limit must be 1 or more"),
        (("status", "bad id"), "invalid job id 'bad id'"),
        (("dead", "redrive", "--group", "g"), "give the ids of the dead letters"),
        (("dead", "list", "1-1"), "list takes no ids"),
        (("--log-level", "LOUD", "groups", "--tag", "poem"), "argument --log-level: invalid choice: 'LOUD'"),
        (("nosuch",), "invalid choice: 'nosuch'"),
        (("worker", "--app-dir", "/nonexistent/dir"), "--app-dir /nonexistent/dir: no such directory"),
    ],
)
async def test_bad_arguments(args: tuple[str, ...], needle: str, settings: Settings) -> None:
    assert_one_line(await run(settings_env(settings), *args), needle)


async def test_log_level_debug_shows_the_traceback_after_the_command_too(settings: Settings) -> None:
    env = {**settings_env(settings), "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    process = await run(env, "enqueue", "joke_poem", "--log-level", "debug")
    assert process.proc.returncode == 2, process.output
    assert any(line.startswith("Traceback") for line in process.stderr), process.output
    assert process.stderr[-1].startswith("tokenbus: cannot reach Redis"), process.output


async def test_global_options_go_before_or_after_the_command(settings: Settings) -> None:
    for args in (("--log-level", "DEBUG", "acl", "worker"), ("acl", "worker", "--log-level", "DEBUG")):
        process = await run(settings_env(settings), *args, "--password", "pw")
        assert process.proc.returncode == 0, process.output


async def test_version(settings: Settings) -> None:
    process = await run(settings_env(settings), "--version")
    assert process.proc.returncode == 0 and process.stdout[0].startswith("tokenbus "), process.output
