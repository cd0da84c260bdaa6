"""Helpers shared by the tests: a model server on its own thread, waiting with deadlines."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
from langchain_core.messages import AIMessageChunk
from pydantic import SecretStr
from redis.asyncio import Redis

from tokenbus.consumer._redis_cluster import AnyRedis
from tokenbus.consumer.attempts import Restart
from tokenbus.consumer.jobs import JobView
from tokenbus.consumer.reader import Gap
from tokenbus.consumer.subscribe import subscribe
from tokenbus.redis_server import RedisClusterProcesses, RedisServerProcess
from tokenbus.schemas.entries import ENTRY_CLASSES, Entry, EntryType
from tokenbus.worker.emitter import JobEmitter, Outcome
from tokenbus.worker.offline_model import Fault, OfflineModelServer, script_for
from tokenbus.worker.presence import WorkerInfo
from tokenbus.worker.publisher import Publisher
from tokenbus.worker.settings import Settings

T = TypeVar("T")

TOKENBUS = str(Path(sys.executable).with_name("tokenbus"))
"""The installed console script, so the tests run the real entry point."""

ENV_PREFIXES = ("TOKENBUS_", "OPENAI_", "REDIS_URL")
"""The environment variables of tokenbus's settings: tests take none of them from the machine."""
JOKE = script_for("Write a joke about cats")
POEM = script_for("Write a short poem about cats")
"""What the offline model answers the joke_poem graph's two prompts about cats with."""

FAULTS = (
    Fault("explode-status", "status"),
    Fault("explode-error", "error", after=3),
    Fault("explode-drop", "disconnect", after=3),
    Fault("stall-forever", "stall", after=2),
)


class ThreadedModelServer:
    """The offline model on its own event loop and thread, so any test loop can call it."""

    def __init__(self, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="model-server", daemon=True)
        self.server = OfflineModelServer(**kwargs)

    def start(self) -> ThreadedModelServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=10)
        return self

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def release(self) -> None:
        """Let the streams held by a ``hold`` fault go on."""
        self._loop.call_soon_threadsafe(self.server.released.set)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a ``tokenbus`` subprocess use ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIXES)}
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        if value is None or value == field.get_default(call_default_factory=True):
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[str(field.validation_alias)] = orjson.dumps(value).decode() if isinstance(value, dict) else str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def start_worker(settings: Settings, *, name: str = "worker", cwd: Path | None = None) -> Process:
    """A ``tokenbus worker`` process with ``settings``, once it serves."""
    worker = await Process.start("worker", env=settings_env(settings), name=name, cwd=cwd)
    await worker.wait_line("worker serves graphs", within=90)  # imports take long on a busy machine
    return worker


async def wait_for(check: Callable[[], Awaitable[T | None]], *, within: float = 20.0, what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy, or fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    delay = 0.005
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


async def wait_until(predicate: Callable[[], T], *, within: float = 20.0, what: str = "condition") -> T:
    """:func:`wait_for` for a plain (not awaitable) predicate."""

    async def check() -> T:
        return predicate()

    return await wait_for(check, within=within, what=what)


async def follow_job(
    redis: AnyRedis, prefix: str, job_id: str, on_chunk: Callable[[Entry], Awaitable[None]] | None = None
) -> tuple[JobView, list[Entry]]:
    """Follow one job through the consumer API until its final entry, calling ``on_chunk`` on each
    chunk (to inject a fault at a given token); return what the job produced and every entry seen."""
    view, entries = JobView(job_id), []
    async with asyncio.timeout(60):
        async for item in subscribe(redis, jobs=[job_id], prefix=prefix, start="0", block_ms=300):
            if isinstance(item, Restart | Gap):
                continue  # the view starts over by itself at a new attempt's entries, and counts what is missing
            assert isinstance(item, Entry)
            entries.append(item)
            view.apply(item)
            if item.is_chunk and on_chunk is not None:
                await on_chunk(item)
    return view, entries


async def read_stream(redis: AnyRedis, key: str) -> list[Entry]:
    return [Entry.decode(f, id=i.decode(), stream=key) for i, f in await redis.xrange(key, "-", "+")]


def text_of(entries: list[Entry]) -> str:
    return "".join(e.content for e in entries if e.is_chunk)


class Process:
    """A ``tokenbus`` subprocess whose output lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._changed = asyncio.Event()
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._pump(proc.stdout, self.stdout)),
            asyncio.create_task(self._pump(proc.stderr, self.stderr)),
        ]

    @classmethod
    async def start(cls, *args: str, env: dict[str, str], name: str = "tokenbus", cwd: Path | None = None) -> Process:
        proc = await asyncio.create_subprocess_exec(
            TOKENBUS, *args, env=env, stdin=asyncio.subprocess.DEVNULL, cwd=cwd,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return cls(proc, name)

    async def _pump(self, stream: asyncio.StreamReader, into: list[str]) -> None:
        async for line in stream:
            into.append(line.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def wait_line(self, needle: str, *, stream: str = "stderr", within: float = 30.0) -> str:
        lines = self.stderr if stream == "stderr" else self.stdout
        async with asyncio.timeout(within):
            while True:
                for line in lines:
                    if needle in line:
                        return line
                if self.proc.returncode is not None and all(r.done() for r in self._readers):
                    break
                self._changed.clear()
                await self._changed.wait()
        raise AssertionError(f"{self.name} exited ({self.proc.returncode}) without printing {needle!r}:\n{self.output}")

    async def wait(self, within: float = 60.0) -> int:
        async with asyncio.timeout(within):
            code = await self.proc.wait()
            await asyncio.gather(*self._readers)
        return code

    async def stop(self, sig: int = signal.SIGTERM, within: float = 30.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            return await self.wait(within)
        except TimeoutError:
            self.proc.kill()
            return await self.wait(within)

    @property
    def output(self) -> str:
        return "\n".join(["--- stdout", *self.stdout, "--- stderr", *self.stderr[-60:]])


async def start_gateway(settings: Settings, port: int, *, name: str = "gateway", **env: str) -> Process:
    """A ``tokenbus serve`` process on ``port`` with ``settings`` (and ``TOKENBUS_GATEWAY_*`` in
    ``env``), once it accepts connections."""
    gateway = await Process.start("serve", "--port", str(port), env={**settings_env(settings), **env}, name=name)
    await gateway.wait_line("gateway listening on", within=90)  # imports take long on a busy machine
    return gateway


def entry(kind: EntryType, job: str, seq: int, attempt: int = 1, **values: Any) -> Entry:
    return ENTRY_CLASSES[kind](job=job, attempt=attempt, seq=seq, ts=seq, **values)


async def write(redis: AnyRedis, key: str, *entries: Entry) -> list[str]:
    return [(await redis.xadd(key, e.encode())).decode() for e in entries]  # type: ignore[arg-type]


def token(job: str, seq: int, text: str, tag: str = "poem", attempt: int = 1, node: str = "call_model") -> Entry:
    return entry(EntryType.TOKEN, job, seq, attempt, content=text, tags=(tag,), node=node)


async def emit_while_paused(
    publisher: Publisher, emitter: JobEmitter, paused: Redis, words: list[str], metadata: dict[str, Any]
) -> int:
    """Write an attempt whose chunks queue up while ``paused`` (the Redis, or the cluster master, of
    the job's stream) holds the start entry's write: ``CLIENT PAUSE WRITE``, the start entry, the
    chunks as one model call, then unpause and end. How many chunks merged while it was paused."""
    try:
        await paused.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
        emitter.start({"graph": "g"})
        await wait_until(lambda: publisher.buffered == 0, what="the start entry in flight, held by Redis")
        for word in words:
            emitter.message(AIMessageChunk(content=word, id="run-1"), metadata)
        merged: int = publisher.chunks_merged
        await paused.execute_command("CLIENT", "UNPAUSE")
        emitter.finish(Outcome())
        await emitter.sink.flushed()
        emitter.sink.check()
        return merged
    finally:
        await paused.execute_command("CLIENT", "UNPAUSE")


def replica_of(cluster: RedisClusterProcesses, key: str) -> RedisServerProcess | None:
    """A live, connected replica of the master serving ``key``, as that master sees it."""
    master = cluster.master_of(key)
    node_id = redis_cli(master, "CLUSTER", "MYID").strip()
    for line in redis_cli(master, "CLUSTER", "REPLICAS", node_id).splitlines():
        fields = line.split()
        if len(fields) > 7 and "fail" not in fields[2] and fields[7] == "connected":
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            return next((n for n in cluster.nodes if n.port == port and n.running), None)
    return None


def redis_cli(node: RedisServerProcess, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(node.port), *args], capture_output=True, text=True, check=True, timeout=10
    ).stdout


async def cut_replication(replica: RedisServerProcess) -> None:
    """The replica drops its link to its master and cannot make a new one (it authenticates with a
    password the master does not have): the master acknowledges writes its replica will never get."""
    client = Redis(host="127.0.0.1", port=replica.port, socket_timeout=10)
    try:
        await client.config_set("masterauth", "not-the-masters-password")
        await client.execute_command("CLIENT", "KILL", "TYPE", "master")
    finally:
        await client.aclose()


def worker_record(settings: Settings, worker_id: str, *, graphs: tuple[str, ...], seen_ago_ms: int) -> bytes:
    """A worker's record in ``<prefix>:workers``, as a worker writes it, last seen ``seen_ago_ms`` ago."""
    now = int(time.time() * 1000)
    return WorkerInfo(
        id=worker_id, host="elsewhere", pid=1, queue=settings.queue_name, graphs=graphs, max_jobs=1, running=0,
        started_ms=now - seen_ago_ms, seen_ms=now - seen_ago_ms, heartbeat_ms=5000,
    ).to_json()  # fmt: skip


def spread(
    cluster: RedisClusterProcesses, key_of: Callable[[str], str], n: int, *, taken: tuple[str, ...] = ()
) -> list[str]:
    """``n`` names whose keys (``key_of(name)``) are served by ``n`` different masters, none of
    them the master of a key in ``taken``."""
    names: dict[int, str] = {}
    busy = {cluster.master_of(key).port for key in taken}
    i = 0
    while len(names) < n:
        name = f"n{i}"
        port = cluster.master_of(key_of(name)).port
        if port not in busy:
            names.setdefault(port, name)
        i += 1
        assert i < 1000, "the cluster's masters serve too few slots"
    return list(names.values())
