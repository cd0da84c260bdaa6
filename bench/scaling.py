"""Scaling: 1 against 2 ``tokenbus worker`` processes on one Redis, CPU-bound and paced jobs."""

from __future__ import annotations

import itertools
import time

from bench.harness import Bench, consumer_result, paced_tokenbus, start_consumer, worker_processes
from tokenbus.worker.client import TokenbusClient


async def scaling(bench: Bench) -> None:
    """1 vs 2 worker processes on one Redis: 16 CPU-bound jobs of each mode, then paced jobs at
    loads one process cannot carry. Each process runs its share of the jobs at once (max_jobs)."""
    jobs, n = (8, 5_000) if bench.quick else (16, 20_000)
    for mode, processes in itertools.product(("messages", "custom"), (1, 2)):
        # a tag stream cap above the total: a consumer that falls behind must not lose terminal
        # entries to trimming (it would be told of the gap, but would wait for those jobs forever)
        settings = bench.settings(TOKENBUS_MAX_JOBS=jobs // processes, TOKENBUS_TAG_MAXLEN=jobs * n * 2)
        async with worker_processes(bench, settings, processes):
            consumer = await start_consumer(bench, settings.prefix, "--tag", "bench", "--jobs", str(jobs))
            async with await TokenbusClient.connect(settings) as client:
                t0 = time.time()
                for _ in range(jobs):
                    await client.enqueue(f"bench_{mode}", {"n": n}, modes=[mode])
                result = await consumer_result(consumer)
        bench.record(f"scaling_{mode}_{processes}proc_chunks_per_s", (result["entries"] - jobs) / (result["last"] - t0))
    rate, seconds = 100.0, (2 if bench.quick else 5)
    for paced_jobs, processes in itertools.product([40] if bench.quick else [500, 600, 700, 800], (1, 2)):
        (_, p99, _), _ = await paced_tokenbus(bench, paced_jobs, int(rate * seconds), rate, processes)
        bench.record(f"scaling_paced_{paced_jobs}jobs_{processes}proc_p99_ms", p99)
