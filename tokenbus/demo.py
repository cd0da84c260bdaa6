"""``tokenbus demo``: the LangGraph how-to, end to end through Redis streams.

Starts what is not configured (a private Redis, the offline model), runs a worker in this
process, and for each of the two forms of the ``joke_poem`` graph (``messages`` mode through
``ChatOpenAI``, ``custom`` mode through ``AsyncOpenAI`` and a stream writer) enqueues the job and
shows two consumers, one subscribed to the ``joke`` tag and one to ``poem``, printing tokens live.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import TextIO

from tokenbus.consumer.reader import latest_positions
from tokenbus.consumer.subscribe import subscribe
from tokenbus.redis_server import start_private_redis
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.schemas.job import StreamMode
from tokenbus.worker.app import build_worker, stop_worker
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.redis_client import StreamsRedis, streams_from_settings
from tokenbus.worker.settings import Settings

TAGS = ("joke", "poem")
MODES: dict[StreamMode, str] = {
    "messages": "messages mode: ChatOpenAI models tagged 'joke' and 'poem'",
    "custom": "custom mode: openai.AsyncOpenAI + writer((chunk, {..., 'tags': [...]}))",
}


async def run_demo(settings: Settings, *, topic: str, out: TextIO, redis: str = "auto") -> int:
    async with contextlib.AsyncExitStack() as stack:
        if settings.redis_url is None:
            server = await asyncio.to_thread(start_private_redis, prefer_fake=redis == "fake")
            stack.push_async_callback(asyncio.to_thread, server.close)
            settings = settings.model_copy(update={"redis_url": server.url})
            out.write(f"Redis: a private {server.kind} at {server.url} (set REDIS_URL to use yours)\n")
        else:
            out.write(f"Redis: {settings.redis_url}\n")
        model = "the built-in offline model" if settings.offline else settings.openai_base_url or "OpenAI"
        out.write(f"Model: {settings.model} via {model}\n")

        worker = build_worker(settings, handle_signals=False, poll_delay_s=0.05)
        worker_task = asyncio.create_task(worker.async_run())
        stack.push_async_callback(stop_worker, worker, worker_task)
        client_redis = streams_from_settings(settings, socket_timeout=15)
        stack.push_async_callback(client_redis.aclose)
        client = await TokenbusClient.connect(settings)
        stack.push_async_callback(client.close)

        async def show_jobs() -> bool:
            ok = True
            for mode, title in MODES.items():
                out.write(f"\n=== {title} ===\n")
                job_id = f"demo-{mode}-{uuid.uuid4().hex[:8]}"
                ok &= await _show_job(settings, client_redis, client, job_id, mode, topic, out)
            return ok

        jobs = asyncio.create_task(show_jobs())
        await asyncio.wait([jobs, worker_task], return_when=asyncio.FIRST_COMPLETED)
        if not jobs.done():  # the demo cannot go on without its worker
            jobs.cancel()
            error = worker_task.exception() if not worker_task.cancelled() else "cancelled"
            out.write(f"\nthe worker stopped: {error}\n")
            return 1
        ok = jobs.result()

        keys = settings.keys
        out.write("\nWhat the streams hold now:\n")
        for tag in TAGS:
            out.write(f"  XLEN {keys.tag(tag)} = {await client_redis.xlen(keys.tag(tag))}\n")
        poem = keys.tag("poem")
        out.write(f"Read them from any client: redis-cli -u {settings.redis_url} XRANGE '{poem}' - + COUNT 2\n")
        return 0 if ok else 1


async def _show_job(
    settings: Settings,
    redis: StreamsRedis,
    client: TokenbusClient,
    job_id: str,
    mode: StreamMode,
    topic: str,
    out: TextIO,
) -> bool:
    """Enqueue one job while a consumer per tag follows it; print each consumer's tokens as they come."""
    keys = settings.keys
    streams = [keys.tag(t) for t in TAGS]
    resume = await latest_positions(redis, streams)  # subscribe from "now", before the job starts
    queue: asyncio.Queue[tuple[str, Entry] | None] = asyncio.Queue()

    async def consume(tag: str) -> None:
        try:
            async for item in subscribe(
                redis, tags=[tag], jobs=[job_id], prefix=settings.prefix, resume=resume, until_final=True
            ):
                if isinstance(item, Entry):
                    await queue.put((tag, item))
        finally:
            await queue.put(None)

    consumers = [asyncio.create_task(consume(tag)) for tag in TAGS]
    await client.enqueue("joke_poem", {"topic": topic}, modes=[mode], job_id=job_id)
    out.write(f"job {job_id} enqueued; consumers subscribed to tags: {', '.join(TAGS)}\n")
    current, finished, ok = None, 0, True
    while finished < len(consumers):
        item = await queue.get()
        if item is None:
            finished += 1
            continue
        tag, entry = item
        if entry.is_chunk and entry.content:
            if tag != current:
                out.write(f"\n[{tag} consumer] " if current else f"[{tag} consumer] ")
                current = tag
            out.write(entry.content + "|")
            out.flush()
        elif entry.is_final and entry.type is not EntryType.END:
            ok = False
            out.write(f"\n[{tag} consumer] job {entry.type.value}: {entry.error}\n")
    await asyncio.gather(*consumers)
    out.write("\n")
    return ok
