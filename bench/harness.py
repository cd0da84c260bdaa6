"""What every scenario shares: the run's state (:class:`Bench`), consumer and worker processes, an
in-process worker, where a measure's streams live (:class:`Streams`), and the two measures more
than one scenario takes (:func:`tokenbus_e2e`, :func:`paced_tokenbus`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis

from bench.graphs import GRAPHS
from tokenbus.worker.app import build_worker, stop_worker
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.job import RESOURCES, run_graph
from tokenbus.worker.redis_client import streams_from_settings
from tokenbus.worker.settings import Settings

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass
class Bench:
    """One run: its private Redis and offline model, its sizes, and every figure recorded."""

    redis_url: str
    model_url: str
    quick: bool
    runs: int
    results: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    consumers: list[asyncio.subprocess.Process] = field(default_factory=list)
    """Every consumer process started, so that a run stopped early stops them too."""

    def record(self, name: str, value: float) -> None:
        self.results.setdefault(name, []).append(value)
        print(f"  {name}: {value:,.3f}", file=sys.stderr, flush=True)

    def settings(self, **overrides: Any) -> Settings:
        prefix = f"b{uuid.uuid4().hex[:8]}"
        values: dict[str, Any] = {
            "REDIS_URL": self.redis_url,
            "TOKENBUS_PREFIX": prefix,
            "TOKENBUS_QUEUE": f"{prefix}:queue",
            "OPENAI_BASE_URL": self.model_url,
            "OPENAI_API_KEY": "bench",
            "TOKENBUS_GRAPHS": GRAPHS,
            "TOKENBUS_MAX_JOBS": 500,
            "TOKENBUS_TAG_MAXLEN": 200_000,
            "TOKENBUS_JOB_MAXLEN": 1_200_000,
            **overrides,
        }
        return Settings(**values)

    @property
    def streams(self) -> Streams:
        """The run's own Redis, holding the queue and the streams (every scenario but ``scaleout``)."""
        return Streams(self.redis_url, (self.redis_url,), apart=False)


@dataclass(frozen=True)
class Streams:
    """Where a measure's streams live: the run's own Redis (with the queue), or a deployment of
    their own (``TOKENBUS_STREAMS_URL``: a single Redis, or a Redis Cluster), and the nodes whose
    CPU is theirs (a cluster's masters: ``INFO cpu`` of each)."""

    url: str
    masters: tuple[str, ...]
    cluster: bool = False
    apart: bool = True

    @property
    def overrides(self) -> dict[str, Any]:
        """The settings that point a worker at them."""
        if not self.apart:
            return {}
        return {"TOKENBUS_STREAMS_URL": self.url, "TOKENBUS_STREAMS_CLUSTER": self.cluster}

    async def cpu(self) -> list[float]:
        """CPU seconds (user + system) each master has used so far."""
        seconds = []
        for url in self.masters:
            async with Redis.from_url(url) as redis:
                seconds.append(await redis_cpu(redis))
        return seconds

    async def reset_stats(self) -> None:
        """``CONFIG RESETSTAT`` on each master (the bench's own servers): command statistics from here."""
        for url in self.masters:
            async with Redis.from_url(url) as redis:
                await redis.config_resetstat()

    async def command_seconds(self, commands: Sequence[str]) -> float:
        """Seconds the masters spent executing ``commands`` since :meth:`reset_stats` (``INFO commandstats``)."""
        total = 0.0
        for url in self.masters:
            async with Redis.from_url(url) as redis:
                stats = await redis.info("commandstats")
            total += sum(stats.get(f"cmdstat_{c}", {}).get("usec", 0) for c in commands) / 1e6
        return total


async def start_consumer(
    bench: Bench, prefix: str, *args: str, streams: Streams | None = None
) -> asyncio.subprocess.Process:
    streams = streams or bench.streams
    cluster = ("--cluster",) if streams.cluster else ()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.consumer", streams.url, prefix, *args, *cluster,
        stdout=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    bench.consumers.append(proc)
    assert proc.stdout is not None
    assert (await proc.stdout.readline()).strip() == b"ready"
    return proc


async def consumer_result(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    out, _ = await proc.communicate()
    result: dict[str, Any] = orjson.loads(out.splitlines()[-1])
    return result


async def redis_cpu(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class RunningWorker:
    """An in-process worker (this process's CPU time is the worker's), polling arq's queue at the
    production default (a faster poll costs the worker a Redis round trip every few ms)."""

    def __init__(self, settings: Settings) -> None:
        self.worker = build_worker(settings, handle_signals=False)

    async def __aenter__(self) -> RunningWorker:
        self.task = asyncio.create_task(self.worker.async_run())
        while "tokenbus" not in self.worker.ctx:  # noqa: ASYNC110 (arq offers no start-up event)
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await stop_worker(self.worker, self.task)


@contextlib.asynccontextmanager
async def worker_processes(bench: Bench, settings: Settings, count: int) -> AsyncIterator[None]:
    """``count`` ``tokenbus worker`` processes serving ``settings``' queue, each up and serving."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENBUS_GRAPHS": orjson.dumps(GRAPHS).decode()}
    env.update(
        REDIS_URL=bench.redis_url, TOKENBUS_PREFIX=settings.prefix, TOKENBUS_QUEUE=settings.queue_name,
        TOKENBUS_TAG_MAXLEN=str(settings.tag_maxlen), TOKENBUS_MAX_JOBS=str(settings.max_jobs),
        OPENAI_BASE_URL=bench.model_url, OPENAI_API_KEY="bench",
        TOKENBUS_COALESCE=settings.coalesce, TOKENBUS_COALESCE_AFTER=str(settings.coalesce_after),
        TOKENBUS_WAIT_REPLICAS=str(settings.wait_replicas),
    )  # fmt: skip
    if settings.streams_url is not None:
        env.update(TOKENBUS_STREAMS_URL=settings.streams_url, TOKENBUS_STREAMS_CLUSTER=str(settings.streams_cluster))
    tokenbus = str(Path(sys.executable).with_name("tokenbus"))
    workers = [
        await asyncio.create_subprocess_exec(tokenbus, "worker", env=env, stderr=asyncio.subprocess.PIPE)
        for _ in range(count)
    ]
    for w in workers:  # wait until each worker serves, then keep draining its log
        assert w.stderr is not None
        while b"worker serves graphs" not in await w.stderr.readline():
            pass
    drains = [asyncio.create_task(w.stderr.read()) for w in workers if w.stderr is not None]
    try:
        yield
    finally:
        for w in workers:
            w.terminate()
            await w.wait()
        await asyncio.gather(*drains)


async def tokenbus_e2e(
    bench: Bench,
    graph: str,
    inputs: dict[str, Any] | Sequence[dict[str, Any]],
    mode: str,
    jobs: int = 1,
    *,
    arq: bool = True,
    warm: bool = False,
    streams: Streams | None = None,
    tags: Sequence[str] | None = None,
    job_ids: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Jobs through a worker, Redis and a consumer process reading every entry with the consumer API.

    ``arq=False`` runs the same job function (``run_graph``: start entry, graph, terminal entry)
    on the worker's resources without arq: what the bus costs apart from arq's job dispatch.
    ``warm`` first runs the same jobs once on the worker, unmeasured: its HTTP and Redis
    connections are then open, as in a worker that has been serving (and as the floor's HTTP
    client is after its first round).

    ``streams`` (default: the run's Redis) and ``overrides`` (``TOKENBUS_COALESCE``...) make the
    worker's settings; ``inputs`` may be one per job, ``job_ids`` (arq only) name the jobs, and
    ``tags`` are the tag streams the consumer follows (default: the graphs' own).
    """
    streams = streams or bench.streams
    settings = bench.settings(TOKENBUS_MAX_JOBS=jobs, **streams.overrides, **(overrides or {}))
    tags = tags or (["joke", "poem"] if graph == "joke_poem" else ["bench"])
    redis = streams_from_settings(settings)
    per_job = [inputs] * jobs if isinstance(inputs, dict) else list(inputs)
    requests = [{"graph": graph, "input": one, "modes": [mode]} for one in per_job]
    names = list(job_ids or [f"{settings.prefix}-{i}" for i in range(jobs)])
    async with RunningWorker(settings) as running:
        resources = running.worker.ctx[RESOURCES]
        if warm and arq:
            async with await TokenbusClient.connect(settings) as client:
                for one in per_job:
                    await client.enqueue(graph, one, modes=[mode])
            while running.worker.jobs_complete < jobs:  # noqa: ASYNC110 (arq offers no completion event)
                await asyncio.sleep(0.01)
        elif warm:
            await asyncio.gather(
                *(
                    run_graph({RESOURCES: resources, "job_id": f"{job}-warm", "job_try": 1}, request)
                    for job, request in zip(names, requests, strict=True)
                )
            )
        # the consumer reads from its start on: the warm-up's entries are behind it
        consumer = await start_consumer(
            bench, settings.prefix, *[a for t in tags for a in ("--tag", t)], "--jobs", str(jobs), streams=streams
        )
        if arq:
            # every job is queued before the worker may take one, so that one poll starts them all:
            # like the floor's jobs, they start together (jobs queued across two polls would wait
            # for the next one: arq's queue latency, not the bus's)
            running.worker.allow_pick_jobs = False
            async with await TokenbusClient.connect(settings) as client:
                names = [
                    await client.enqueue(graph, one, modes=[mode], job_id=job_ids[i] if job_ids else None)
                    for i, one in enumerate(per_job)
                ]
        cpu0, rcpu0 = time.process_time(), await streams.cpu()
        if arq:
            running.worker.allow_pick_jobs = True
        else:
            await asyncio.gather(
                *(
                    run_graph({RESOURCES: resources, "job_id": job, "job_try": 1}, request)
                    for job, request in zip(names, requests, strict=True)
                )
            )
        result = await consumer_result(consumer)
        cpu1, rcpu1 = time.process_time(), await streams.cpu()
    # from the first job's start (waiting in arq's queue for the next poll is not the bus's doing)
    # to the consumer's receipt of the last terminal entry; ms resolution
    starts = [int((await redis.xrange(settings.keys.job(job), count=1))[0][1][b"ts"]) / 1000 for job in names]
    job_key = settings.keys.job(names[0])
    (_, first), (_, last) = (await redis.xrange(job_key, count=1))[0], (await redis.xrevrange(job_key, count=1))[0]
    producing_s = (int(last[b"ts"]) - int(first[b"ts"])) / 1000  # the worker's side alone
    await redis.aclose()
    chunks = result["chunks"]  # (a merged entry holds several)
    elapsed = result["last"] - min(starts)
    redis_s = [after - before for before, after in zip(rcpu0, rcpu1, strict=True)]
    return {
        "chunks": chunks,
        "entries_per_chunk": (result["entries"] - jobs) / chunks,  # less one terminal entry per job
        "rate": chunks / elapsed,
        "producer_rate": chunks / jobs / max(producing_s, 0.001),
        "worker_us": (cpu1 - cpu0) / chunks * 1e6,
        "redis_us": sum(redis_s) / chunks * 1e6,
        "redis_shares": shares(redis_s),
        "consumer_us": result["cpu"] / chunks * 1e6,
    }


def shares(seconds: Sequence[float]) -> list[float]:
    """Each node's share of the CPU time of all (the busiest first)."""
    total = sum(seconds) or 1.0
    return sorted((s / total for s in seconds), reverse=True)


Percentiles = tuple[float, float, float]


async def paced_tokenbus(
    bench: Bench,
    jobs: int,
    n: int,
    rate: float,
    processes: int = 1,
    *,
    streams: Streams | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[Percentiles, Percentiles]:
    """The paced jobs through ``tokenbus worker`` processes (as deployed: the worker alone in its
    process, like LangGraph alone in the no-sink measure) and a consumer process; the processes
    run all of the jobs at once, each its share. ``streams`` and ``overrides`` as for :func:`tokenbus_e2e`."""
    streams = streams or bench.streams
    settings = bench.settings(TOKENBUS_MAX_JOBS=-(-jobs // processes), **streams.overrides, **(overrides or {}))
    consumer = await start_consumer(
        bench, settings.prefix, "--tag", "bench", "--jobs", str(jobs), "--latency", streams=streams
    )
    async with worker_processes(bench, settings, processes), await TokenbusClient.connect(settings) as client:
        for _ in range(jobs):
            await client.enqueue("bench_paced", {"n": n, "rate": rate}, modes=["custom"])
        result = await consumer_result(consumer)
    return tuple(result["latency_ms"]), tuple(result["from_due_ms"])
