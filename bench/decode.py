"""The ``consumer`` scenario: entries/s through ``subscribe()`` against a raw redis-py XREAD loop."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from bench.harness import Bench, RunningWorker
from tokenbus.consumer.reader import BEGINNING
from tokenbus.consumer.subscribe import subscribe
from tokenbus.schemas.entries import Entry
from tokenbus.worker.client import TokenbusClient


async def raw_xread(redis: Redis, key: str, entries: int) -> int:
    """The baseline: what a user of redis-py writes to read a stream, decoding nothing itself."""
    last, count = BEGINNING, 0
    while count < entries:
        for _, batch in await redis.xread({key: last}, count=1024, block=100):
            count += len(batch)
            last = batch[-1][0]
    return count


async def consumer_decode(bench: Bench) -> None:
    n = 20_000 if bench.quick else 200_000
    settings = bench.settings()
    key = settings.keys.tag("bench")
    async with RunningWorker(settings), await TokenbusClient.connect(settings) as client:
        job = await client.enqueue("bench_messages", {"n": n}, modes=["messages"])
        redis = Redis.from_url(bench.redis_url)
        async for _ in subscribe(redis, jobs=[job], prefix=settings.prefix, start="0"):
            pass  # until the job has ended: the tag stream holds all n entries
    for _ in range(bench.runs):
        # best of three, alternating: a short measure (~1 s) on a shared machine is easily cut
        # by CPU stolen from this VM; each side gets the same chances
        raw_rate = api_rate = full_rate = 0.0
        for _ in range(3):
            start = time.perf_counter()
            raw = await raw_xread(redis, key, n + 1)
            raw_rate = max(raw_rate, raw / (time.perf_counter() - start))
            for full in (False, True):  # full: also read data and meta (JSON parsed on first access)
                start, api = time.perf_counter(), 0
                async for entry in subscribe(redis, tags=["bench"], jobs=[job], prefix=settings.prefix, start="0"):
                    api += 1
                    if full and isinstance(entry, Entry):
                        _ = entry.data, entry.meta
                rate = api / (time.perf_counter() - start)
                if full:
                    full_rate = max(full_rate, rate)
                else:
                    api_rate = max(api_rate, rate)
        bench.record("consumer_raw_xread_entries_per_s", raw_rate)
        bench.record("consumer_api_entries_per_s", api_rate)
        bench.record("ratio_consumer_api_vs_raw", api_rate / raw_rate)
        bench.record("consumer_api_with_data_and_meta_entries_per_s", full_rate)
        bench.record("ratio_consumer_api_with_data_and_meta_vs_raw", full_rate / raw_rate)
    await redis.aclose()
