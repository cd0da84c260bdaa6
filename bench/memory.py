"""Memory: worker RSS and Redis ``used_memory`` job after job, which must stay flat."""

from __future__ import annotations

import os

from redis.asyncio import Redis

from bench.harness import Bench, RunningWorker
from tokenbus.consumer.subscribe import subscribe
from tokenbus.worker.client import TokenbusClient


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


async def memory(bench: Bench) -> None:
    total, per_job = (100_000, 20_000) if bench.quick else (1_000_000, 50_000)
    settings = bench.settings(TOKENBUS_TAG_MAXLEN=100_000, TOKENBUS_JOB_MAXLEN=100_000, TOKENBUS_JOB_TTL=1)
    redis = Redis.from_url(bench.redis_url)
    # the bench's own private server: start empty. Earlier scenarios leave thousands of streams with
    # long TTLs, among which Redis's sampling expiry takes tens of seconds to find the short ones
    await redis.flushall()
    base = (await redis.info("memory"))["used_memory"] / 1e6
    samples: list[tuple[float, float]] = []
    async with RunningWorker(settings), await TokenbusClient.connect(settings) as client:
        for _ in range(total // per_job):
            job = await client.enqueue("bench_custom", {"n": per_job}, modes=["custom"])
            async for _ in subscribe(redis, jobs=[job], prefix=settings.prefix, start="0"):
                pass
            samples.append((rss_mb(), (await redis.info("memory"))["used_memory"] / 1e6 - base))
    await redis.aclose()
    bench.notes["memory"] = {"tokens": total, "per_job": per_job, "rss_mb_and_redis_growth_mb": samples}
    half = len(samples) // 2  # flat means: the second half of the run grows no further than the first
    bench.record("memory_worker_rss_growth_second_half_mb", samples[-1][0] - samples[half][0])
    bench.record("memory_worker_rss_growth_mb", samples[-1][0] - samples[0][0])
    bench.record("memory_redis_growth_second_half_mb", samples[-1][1] - samples[half][1])
    bench.record("memory_redis_growth_peak_mb", max(s[1] for s in samples))
