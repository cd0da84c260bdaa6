"""The queue's Redis behind Sentinel: a worker and an enqueuer that know only the Sentinels run
jobs; the master is killed, the Sentinels promote its replica, and a job queued before the
failover (replicated) and one queued after it both run."""

from __future__ import annotations

import asyncio

from tests.conftest import make_settings
from tests.support import JOKE, POEM, ThreadedModelServer
from tokenbus.redis_server import RedisSentinelProcesses, wait_replicated
from tokenbus.schemas.entries import EntryType
from tokenbus.worker.app import build_worker
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.settings import Settings


async def run_burst_worker(settings: Settings) -> None:
    worker = build_worker(settings, burst=True, handle_signals=False, poll_delay_s=0)
    try:
        await worker.async_run()
    finally:
        await worker.close()


async def test_jobs_queued_before_and_after_a_sentinel_failover_run(
    model_server: ThreadedModelServer, prefix: str
) -> None:
    setup = RedisSentinelProcesses()
    await asyncio.to_thread(setup.start)
    try:
        # REDIS_URL's host is nobody's: everything goes through the Sentinels
        settings = make_settings(
            "redis://127.0.0.1:1/0", model_server.base_url, prefix, TOKENBUS_SENTINELS=setup.sentinels
        )
        async with await TokenbusClient.connect(settings) as client:
            first = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"])
            await run_burst_worker(settings)
            assert (await client.result(first)).status is EntryType.END

            queued = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"])
            await asyncio.to_thread(wait_replicated, setup.master)  # queued is on the replica too
        await asyncio.to_thread(setup.kill_master)
        assert setup.master_port() == setup.replica.port

        async with await TokenbusClient.connect(settings) as client:
            after = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"])
            await run_burst_worker(settings)
            for job_id in (queued, after):
                view = await client.result(job_id)
                assert view.status is EntryType.END and view.attempt == 1
                assert view.texts == {"joke": JOKE, "poem": POEM}
    finally:
        await asyncio.to_thread(setup.close)
