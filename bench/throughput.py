"""Throughput: chunks per second through tokenbus against LangGraph alone (the floor), the bus
with no graph, and a naive publisher; and ``joke_poem`` over HTTP, through arq and without it."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import httpx2
import orjson
from langchain_core.messages import AIMessageChunk
from redis.asyncio import Redis

from bench.graphs import WORDS, custom, messages
from bench.harness import Bench, Streams, consumer_result, shares, start_consumer, tokenbus_e2e
from tokenbus.consumer.reader import BEGINNING
from tokenbus.schemas.entries import chunk_fields
from tokenbus.worker._langgraph import install_writer
from tokenbus.worker.emitter import JobEmitter, Outcome, StreamLimits
from tokenbus.worker.graphs import joke_poem
from tokenbus.worker.publisher import Publisher
from tokenbus.worker.redis_client import streams_from_settings


async def floor(
    graph: Any, inputs: dict[str, Any], mode: str, config: dict[str, Any] | None = None
) -> tuple[int, float]:
    """LangGraph alone: chunks and seconds of ``astream`` with nothing done per chunk."""
    count, start = 0, time.perf_counter()
    async for _ in graph.astream(inputs, config, stream_mode=[mode], subgraphs=True):
        count += 1
    return count, time.perf_counter() - start


async def floor_without_astream(graph: Any, inputs: dict[str, Any]) -> tuple[int, float]:
    """LangGraph alone with the cheapest ``custom`` sink: ``ainvoke`` with a stream writer that
    counts (installed as a job's is), no ``astream`` queue."""
    count, start = 0, time.perf_counter()

    def writer(chunk: Any) -> None:
        nonlocal count
        count += 1

    configurable: dict[str, Any] = {}
    install_writer(configurable, writer)
    await graph.ainvoke(inputs, {"configurable": configurable})
    return count, time.perf_counter() - start


async def floor_after_a_round_trip(
    redis: Redis, graph: Any, inputs: dict[str, Any], mode: str, config: dict[str, Any]
) -> tuple[int, float]:
    """:func:`floor` for a job that starts after a Redis round trip of its own, as arq starts each
    job after its MULTI prelude: jobs started together then no longer have their model streams tick
    together, which costs the event loop (fewer ready sockets per wake-up) with or without a bus."""
    async with redis.pipeline(transaction=True) as pipe:
        await pipe.get("bench:nothing").incr("bench:counter").execute()
    return await floor(graph, inputs, mode, config)


async def bus_alone(
    bench: Bench,
    mode: str,
    n: int,
    *,
    streams: Streams | None = None,
    tags: Sequence[str] = ("bench",),
    jobs: Sequence[str] = ("alone",),
    coalesce_after: int | None = None,
    wait_replicas: int = 0,
) -> dict[str, Any]:
    """The bus with no graph at all: ``n`` chunks, made beforehand with the metadata and payloads
    the bench graph's chunks carry, emitted in a loop (pausing as a model's token callback does)
    through a publisher, Redis and a consumer process. What the bus can carry on this machine
    whatever LangGraph costs: no worker can do better than this, so its ratio to the floor bounds
    ``ratio_<mode>_vs_floor``. With the CPU per chunk of Redis (all of it, and the part spent
    executing XADD and XREAD, from Redis's command statistics), of the consumer and of this
    process (the publisher), and the share of a core each used.

    ``streams``: where they go (default: the run's Redis). The chunks are dealt round-robin to
    ``jobs`` (job ids, as given: on a cluster, the caller picks their slots), job ``k`` tagging its
    chunks ``tags[k % len(tags)]`` (one tag for all: one hot tag stream). ``coalesce_after`` and
    ``wait_replicas`` are the publisher's (``TOKENBUS_COALESCE_AFTER`` with
    ``TOKENBUS_COALESCE=adaptive``, ``TOKENBUS_WAIT_REPLICAS``)."""
    streams = streams or bench.streams
    settings = bench.settings(**streams.overrides)
    job_tags = [tags[k % len(tags)] for k in range(len(jobs))]
    chunks: list[list[tuple[Any, ...]]]  # each job's
    if mode == "messages":
        made = [chunk async for chunk in messages.astream({"n": 1}, stream_mode=["messages"], subgraphs=True)]
        _, _, (message, metadata) = made[0]
        # one metadata object per job, as a model call's chunks share theirs
        metas = [metadata if metadata.get("tags") == [tag] else {**metadata, "tags": [tag]} for tag in job_tags]
        chunks = [
            [(AIMessageChunk(content=WORDS[i % len(WORDS)], id=message.id), meta) for i in range(k, n, len(jobs))]
            for k, meta in enumerate(metas)
        ]
    else:
        chunks = [
            [({"content": WORDS[i % len(WORDS)], "tags": [tag]},) for i in range(k, n, len(jobs))]
            for k, tag in enumerate(job_tags)
        ]
    follow = [a for t in dict.fromkeys(job_tags) for a in ("--tag", t)]
    consumer = await start_consumer(bench, settings.prefix, *follow, "--jobs", str(len(jobs)), streams=streams)
    redis = streams_from_settings(settings)
    publisher = Publisher(
        redis,
        batch_max=settings.publish_batch_max,
        buffer_max=settings.publish_buffer_max,
        coalesce_after=coalesce_after,
        wait_replicas=wait_replicas,
    ).start()
    limits = StreamLimits(settings.tag_maxlen, settings.job_maxlen, settings.job_ttl_s)
    emitters = [JobEmitter(publisher, settings.keys, limits, job, 1) for job in jobs]
    emits = [emitter.message if mode == "messages" else emitter.custom for emitter in emitters]
    calls = [(emits[i % len(jobs)], chunks[i % len(jobs)][i // len(jobs)]) for i in range(n)]
    try:
        await streams.reset_stats()  # the bench's own servers: their command statistics from here
        rcpu0, cpu0, start = await streams.cpu(), time.process_time(), time.time()
        for emitter in emitters:
            emitter.start({})
        for emit, chunk in calls:
            emit(*chunk)
            if publisher.congested:
                await publisher.wait_writable()
            elif publisher.should_yield():
                await asyncio.sleep(0)
        for emitter in emitters:
            emitter.finish(Outcome())
        for emitter in emitters:
            await emitter.sink.flushed()
            emitter.sink.check()  # nothing lost, nor (with wait_replicas) short of replicas: else no measure
        cpu1 = time.process_time()
        result = await consumer_result(consumer)
        rcpu1, commands_s = await streams.cpu(), await streams.command_seconds(("xadd", "xread"))
    finally:
        await publisher.close()
        await redis.aclose()
    chunks_out = result["chunks"]  # (a merged entry holds several)
    elapsed = result["last"] - start
    redis_s = [after - before for before, after in zip(rcpu0, rcpu1, strict=True)]
    return {
        "rate": chunks_out / elapsed,
        "redis_us": sum(redis_s) / chunks_out * 1e6,
        "redis_shares": shares(redis_s),
        "redis_core": [s / elapsed for s in redis_s],  # each master's share of one core
        "redis_commands_us": commands_s / chunks_out * 1e6,
        "consumer_us": result["cpu"] / chunks_out * 1e6,
        "consumer_core": result["cpu"] / elapsed,
        "publisher_us": (cpu1 - cpu0) / chunks_out * 1e6,
        "publisher_core": (cpu1 - cpu0) / elapsed,
        "entries_per_chunk": (result["entries"] - len(jobs)) / chunks_out,  # less one terminal entry per job
    }


async def naive_e2e(bench: Bench, graph: Any, inputs: dict[str, Any], mode: str) -> float:
    """The naive publisher: one awaited XADD per chunk and per tag, same fields as tokenbus."""
    prefix, job = f"n{uuid.uuid4().hex[:8]}", "naive"
    job_key, tag_key = f"{prefix}:job:{{{job}}}", f"{prefix}:tag:{{bench}}"
    consumer = await start_consumer(bench, prefix, "--job", job, "--start", BEGINNING)
    redis = Redis.from_url(bench.redis_url)
    t0, seq = time.time(), 0
    async for _, _, chunk in graph.astream(inputs, stream_mode=[mode], subgraphs=True):
        payload, meta = (chunk[0].content, chunk[1]) if mode == "messages" else (chunk["content"], {"tags": ["bench"]})
        fields = chunk_fields("token", job, 1, seq, int(time.time() * 1000), b'["bench"]', "node", payload, b"{}",
                              orjson.dumps(meta, default=repr))  # fmt: skip
        seq += 1
        mapping = dict(zip(fields[::2], fields[1::2], strict=True))
        await redis.xadd(job_key, mapping, maxlen=1_000_000, approximate=True)  # type: ignore[arg-type]
        await redis.xadd(tag_key, mapping, maxlen=200_000, approximate=True)  # type: ignore[arg-type]
    end = chunk_fields("end", job, 1, seq, 0, b"[]", "", "", b"{}", b"{}")
    await redis.xadd(job_key, dict(zip(end[::2], end[1::2], strict=True)))  # type: ignore[arg-type]
    result = await consumer_result(consumer)
    await redis.aclose()
    return float(seq / (result["last"] - t0))


async def throughput(bench: Bench) -> None:
    n = 5_000 if bench.quick else 20_000
    http_jobs = 5 if bench.quick else 30
    rounds = 1 if bench.quick else 3
    async with httpx2.AsyncClient() as http:
        endpoint = joke_poem.ModelEndpoint("gpt-4o-mini", bench.model_url, "bench", http)
        jp = joke_poem.build(endpoint)
        for run in range(bench.runs):
            print(f"throughput run {run + 1}/{bench.runs}", file=sys.stderr)
            for mode, graph in (("messages", messages), ("custom", custom)):
                # each measure is short (~1 s): best of `rounds`, floor and tokenbus alternating,
                # so that CPU stolen from this VM for a moment does not decide the ratio
                floor_rate, alone, e2e = 0.0, None, None
                for _ in range(rounds):
                    count, seconds = await floor(graph, {"n": n}, mode)
                    floor_rate = max(floor_rate, count / seconds)
                    candidate = await bus_alone(bench, mode, n)
                    if alone is None or candidate["rate"] > alone["rate"]:
                        alone = candidate
                    candidate = await tokenbus_e2e(bench, f"bench_{mode}", {"n": n}, mode)
                    if e2e is None or candidate["rate"] > e2e["rate"]:
                        e2e = candidate
                assert e2e is not None and alone is not None
                bench.record(f"floor_{mode}_chunks_per_s", floor_rate)
                bench.record(f"tokenbus_{mode}_chunks_per_s", e2e["rate"])
                bench.record(f"ratio_{mode}_vs_floor", e2e["rate"] / floor_rate)
                bench.record(f"ratio_{mode}_producer_vs_floor", e2e["producer_rate"] / floor_rate)
                bench.record(f"bus_alone_{mode}_chunks_per_s", alone["rate"])
                bench.record(f"ratio_bus_alone_{mode}_vs_floor", alone["rate"] / floor_rate)
                for part in ("redis", "redis_commands", "consumer"):
                    bench.record(f"cpu_{part}_us_per_chunk_{mode}_bus_alone", alone[f"{part}_us"])
                for part in ("worker", "redis", "consumer"):
                    bench.record(f"cpu_{part}_us_per_chunk_{mode}", e2e[f"{part}_us"])
                if mode == "custom":
                    count, seconds = max([await floor_without_astream(graph, {"n": n}) for _ in range(rounds)])
                    bench.record("floor_custom_without_astream_chunks_per_s", count / seconds)
                naive = await naive_e2e(bench, graph, {"n": n}, mode)
                bench.record(f"naive_{mode}_chunks_per_s", naive)
                bench.record(f"ratio_{mode}_vs_naive", e2e["rate"] / naive)
            # joke_poem over HTTP: the same load both ways (http_jobs at once)
            config = {"configurable": {"tokenbus_modes": ["messages"]}}
            floor_rate = staggered_rate = bus_rate = direct_rate = 0.0
            bus_cpu = direct_cpu = floor_cpu = float("inf")
            redis = Redis.from_url(bench.redis_url)
            for _ in range(rounds):
                for staggered in (False, True):
                    started, cpu = time.perf_counter(), time.process_time()
                    done = await asyncio.gather(
                        *(
                            floor_after_a_round_trip(redis, jp, {"topic": "cats"}, "messages", config)
                            if staggered
                            else floor(jp, {"topic": "cats"}, "messages", config)
                            for _ in range(http_jobs)
                        )
                    )
                    chunks = sum(c for c, _ in done)
                    rate = chunks / (time.perf_counter() - started)
                    if staggered:
                        staggered_rate = max(staggered_rate, rate)
                    else:
                        floor_rate = max(floor_rate, rate)
                        floor_cpu = min(floor_cpu, (time.process_time() - cpu) / chunks * 1e6)
                e2e = await tokenbus_e2e(bench, "joke_poem", {"topic": "cats"}, "messages", jobs=http_jobs, warm=True)
                bus_rate, bus_cpu = max(bus_rate, e2e["rate"]), min(bus_cpu, e2e["worker_us"])
                e2e = await tokenbus_e2e(
                    bench, "joke_poem", {"topic": "cats"}, "messages", jobs=http_jobs, arq=False, warm=True
                )
                direct_rate, direct_cpu = max(direct_rate, e2e["rate"]), min(direct_cpu, e2e["worker_us"])
            await redis.aclose()
            bench.record("floor_joke_poem_http_staggered_chunks_per_s", staggered_rate)
            bench.record("ratio_joke_poem_http_vs_staggered_floor", bus_rate / staggered_rate)
            bench.record("floor_joke_poem_http_chunks_per_s", floor_rate)
            bench.record("tokenbus_joke_poem_http_chunks_per_s", bus_rate)
            bench.record("ratio_joke_poem_http_vs_floor", bus_rate / floor_rate)
            bench.record("ratio_joke_poem_http_without_arq_vs_floor", direct_rate / floor_rate)
            bench.record("cpu_floor_us_per_chunk_joke_poem_http", floor_cpu)
            bench.record("cpu_worker_us_per_chunk_joke_poem_http", bus_cpu)
            bench.record("cpu_worker_us_per_chunk_joke_poem_http_without_arq", direct_cpu)
