"""The queue's Redis behind Sentinel: a worker and an enqueuer that know only the Sentinels run
jobs; the master is killed, the Sentinels promote its replica, and a job queued before the
failover (replicated) and one queued after it both run; a job running through the failover
ends once, with its full text."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from tests.conftest import make_settings
from tests.support import JOKE, POEM, Process, ThreadedModelServer, follow_job, read_stream, settings_env
from tokenbus.consumer.jobs import job_result
from tokenbus.redis_server import RedisSentinelProcesses, wait_replicated
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.worker.app import build_worker
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.redis_client import streams_from_settings
from tokenbus.worker.settings import Settings

SENTINEL_PASSWORD = "sentinel-secret"
KILL_AT = 5
"""The running job's chunk at which the master is killed."""


async def run_burst_worker(settings: Settings) -> None:
    worker = build_worker(settings, burst=True, handle_signals=False, poll_delay_s=0)
    try:
        await worker.async_run()
    finally:
        await worker.close()


async def test_jobs_queued_before_and_after_a_sentinel_failover_run(
    model_server: ThreadedModelServer, prefix: str
) -> None:
    """Through Sentinels that ask for a password of their own (TOKENBUS_SENTINEL_PASSWORD)."""
    setup = RedisSentinelProcesses(sentinel_password=SENTINEL_PASSWORD)
    await asyncio.to_thread(setup.start)
    try:
        # REDIS_URL's host is nobody's: everything goes through the Sentinels
        settings = make_settings(
            "redis://127.0.0.1:1/0", model_server.base_url, prefix, TOKENBUS_SENTINELS=setup.sentinels,
            TOKENBUS_SENTINEL_PASSWORD=SENTINEL_PASSWORD,
        )  # fmt: skip
        without = await Process.start("jobs", env={**settings_env(settings), "TOKENBUS_SENTINEL_PASSWORD": ""})
        assert await without.wait(within=60) == 2, without.output
        assert without.stderr == [
            f"tokenbus: the Sentinels of TOKENBUS_SENTINELS={setup.sentinels} refused the password of "
            "TOKENBUS_SENTINEL_PASSWORD, or asked for one and it is unset (No master found for 'mymaster' : "
            + ", ".join(
                f"127.0.0.1:{port}: AuthenticationError('Authentication required.')" for port in setup.sentinel_ports
            )
            + "): set it to the Sentinels' requirepass"
        ], without.output
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


async def test_a_job_running_through_a_sentinel_failover_ends_once_with_its_full_text(
    paced_model: ThreadedModelServer, prefix: str
) -> None:
    """The master is killed while a paced job streams and two jobs wait behind it (one job at a
    time); everything it acknowledged has reached its replica (writes held, then replicated), so
    the failover itself loses nothing. The Sentinels promote the replica: the running job goes on
    there (its lease, in the queue's Redis, was replicated) or runs again once its lease lapses;
    either way it ends once, with its full text, and the queued jobs run."""
    setup = RedisSentinelProcesses()
    await asyncio.to_thread(setup.start)
    settings = make_settings(
        "redis://127.0.0.1:1/0", paced_model.base_url, prefix, TOKENBUS_SENTINELS=setup.sentinels,
        TOKENBUS_MAX_JOBS="1", TOKENBUS_HEARTBEAT="0.5",
    )  # fmt: skip
    worker = build_worker(settings, handle_signals=False, poll_delay_s=0.05)
    running = asyncio.create_task(worker.async_run())
    streams = streams_from_settings(settings)
    queued: list[str] = []
    try:
        async with await TokenbusClient.connect(settings) as client:
            job_id = await client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"])

            async def on_chunk(entry: Entry) -> None:
                if entry.seq != KILL_AT or entry.attempt != 1 or queued:
                    return
                for _ in range(2):  # behind the running job (one at a time): they wait in the queue
                    queued.append(await client.enqueue("joke_poem", {"topic": "cats"}, modes=["custom"]))
                assert not await streams.exists(*(settings.keys.job(j) for j in queued))
                master = Redis.from_url(setup.master.url, socket_timeout=10)
                try:  # the job's writes wait, unanswered, until the kill: its replica has all it acknowledged
                    await master.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
                finally:
                    await master.aclose()
                await asyncio.to_thread(wait_replicated, setup.master)
                await asyncio.to_thread(setup.kill_master)

            view, entries = await follow_job(streams, prefix, job_id, on_chunk)
            assert setup.master_port() == setup.replica.port and len(queued) == 2
            assert view.status is EntryType.END and view.texts == {"joke": JOKE, "poem": POEM}, view
            newest = [e.seq for e in entries if e.attempt == view.attempt]
            assert newest == list(range(len(newest))), "duplicates or holes in what the follower saw"
            stream = await read_stream(streams, settings.keys.job(job_id))
            assert [e.type for e in stream if e.is_final] == [EntryType.END]  # once
            print(f"the running job ended with attempt {view.attempt} after the failover")
            for queued_id in queued:
                async with asyncio.timeout(60):
                    done = await job_result(streams, queued_id, prefix=prefix, wait=True)
                assert (done.status, done.attempt, done.texts) == (EntryType.END, 1, {"joke": JOKE, "poem": POEM})
                stream = await read_stream(streams, settings.keys.job(queued_id))
                assert [e.type for e in stream if e.is_terminal] == [EntryType.END]
        # a lease is lost only by an attempt that ran again (a renewal answered late is not a loss)
        assert worker.leases is not None and worker.leases.lost == view.attempt - 1, worker.leases.lost
    finally:
        await worker.close()
        await asyncio.gather(running, return_exceptions=True)
        await streams.aclose()
        await asyncio.to_thread(setup.close)
