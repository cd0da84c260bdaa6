"""Pickup: time from enqueue to the job's ``start`` entry, announced on the wake channel or polled."""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import sys
import time

from arq.connections import RedisSettings, create_pool
from redis.asyncio import Redis

from bench.harness import Bench, worker_processes
from tokenbus.consumer.reader import BEGINNING
from tokenbus.schemas.job import JOB_FUNCTION
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.serializer import job_serializer


async def pickup(bench: Bench) -> None:
    """Time from enqueue to the job's ``start`` entry in the reader's hands, one job at a time, on
    an idle ``tokenbus worker`` process: jobs announced on the wake channel (``TokenbusClient``)
    against the same jobs enqueued with arq alone, found by the worker's poll (the baseline).
    Each enqueue comes at a random moment of the poll cycle, as a user's would."""
    jobs = 5 if bench.quick else 30
    settings = bench.settings()
    redis = Redis.from_url(bench.redis_url)
    async with (
        worker_processes(bench, settings, 1),
        await TokenbusClient.connect(settings) as client,
        contextlib.aclosing(await create_pool(
            RedisSettings.from_dsn(bench.redis_url), job_serializer=job_serializer,
            default_queue_name=settings.queue_name,
        )) as arq,
    ):  # fmt: skip
        request = {"graph": "bench_custom", "input": {"n": 1}, "modes": ["custom"]}

        async def announced() -> str:
            return await client.enqueue("bench_custom", {"n": 1}, modes=["custom"])

        async def polled() -> str:
            job = await arq.enqueue_job(JOB_FUNCTION, request, _queue_name=settings.queue_name)
            assert job is not None
            return job.job_id

        for run in range(bench.runs):
            print(f"pickup run {run + 1}/{bench.runs}", file=sys.stderr)
            for label, enqueue in (("announced", announced), ("polled", polled)):
                waits: list[float] = []
                for _ in range(jobs):
                    await asyncio.sleep(random.uniform(0, settings.poll_delay_s))  # a random phase of the poll
                    started = time.perf_counter()
                    job_key = settings.keys.job(await enqueue())
                    while not await redis.xread({job_key: BEGINNING}, count=1, block=10_000):
                        pass
                    waits.append((time.perf_counter() - started) * 1000)
                bench.record(f"pickup_{label}_p50_ms", statistics.median(waits))
                bench.record(f"pickup_{label}_max_ms", max(waits))
    await redis.aclose()
