"""Scaling out (issue 17): the streams on one Redis against a Redis Cluster, adaptive coalescing on
against off, the ceiling of one hot tag stream, and the cost of ``WAIT``. Every comparison is
measured in the same run, its sides alternating, and recorded with its ratio.

The lead's command (how long it takes: BENCHMARKS.md)::

    ./dev bench --only scaleout --runs 3

Each run measures every comparison once (the throughput sides best of two, alternating, the
side that goes first changing from one run to the next); the report gives min / median / max
over the runs.

The scenario starts deployments of its own, next to the run's Redis (which keeps arq's queue):
a single ``redis-server`` for the streams, a 3-master Redis Cluster with no replicas
(:class:`RedisClusterProcesses`), and, for ``WAIT``, a Redis with one replica and a 3-master
cluster whose masters have one replica each. Workers point at
them with ``TOKENBUS_STREAMS_URL`` (and ``TOKENBUS_STREAMS_CLUSTER``): both sides of a comparison
run the same worker code apart from the client, and Redis CPU counts the streams' servers alone.

- **single vs cluster** (``scaleout_{single,cluster}_*``): the bus alone (custom chunks, no graph,
  :func:`bench.throughput.bus_alone`) and both modes end to end (worker, Redis, consumer process:
  :func:`bench.harness.tokenbus_e2e`), with jobs and tags chosen so that each master serves as many
  job streams and as many tag streams (one tag per job). Chunks/s, worker (or publisher) CPU per
  chunk, Redis CPU per chunk of all masters together and **per shard** (divided by the masters),
  and each master's share (busiest first). On 2 vCPUs the three masters, the worker and the
  consumer share the cores: throughput cannot scale here, CPU per chunk per shard is the figure
  that scales on paper (a shard on a core of its own carries 1e6 / that many chunks/s).
- **coalescing on vs off** (``scaleout_coalesce_{on,off}_*``, on the single Redis): the bus alone
  and custom mode end to end at saturation (chunks/s, tag-stream entries per chunk, Redis,
  consumer and worker CPU per chunk; custom end to end against LangGraph's ``astream`` floor,
  the issue's target: at least 0.6 of it), and 20 paced jobs at 100 tokens/s (p50/p99 latency:
  coalescing must not add latency at low load). The paced payloads carry their own ``t`` and ``due``, so they could
  not merge even if the publisher were congested: at 20 jobs it is not, and this measures what the
  mode costs when nothing merges.
- **hot tag** (``scaleout_hot_tag_*``, on the cluster): many jobs (their job streams spread over
  the masters) all tagged ``hot``: one tag stream, on one master. Chunks/s, the share of a core its
  master, the publisher (this process) and the consumer used (one near 1.0 is the limit; which
  one is written in the report's notes), and the master's capacity on paper (chunks per CPU second of that master:
  what the stream carries when its master has a core of its own and enough publishers feed it).
  Off and on with coalescing.
- **WAIT** (``scaleout_wait{0,1}_*``, on the Redis with a replica; ``scaleout_cluster_wait{0,1}_*``,
  on the cluster with replicas, each master's pipeline ending with its own ``WAIT``): the bus alone
  (chunks/s; on the cluster its jobs and tags spread over the masters) and 20 paced jobs (p99) with
  ``TOKENBUS_WAIT_REPLICAS`` 0 and 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio import RedisCluster

from bench.graphs import custom
from bench.harness import Bench, Streams, paced_tokenbus, tokenbus_e2e
from bench.throughput import bus_alone, floor
from tokenbus.redis_server import RedisClusterProcesses, RedisServerProcess, wait_replicated

T = TypeVar("T")
MASTERS = 3
PACED_JOBS = 20
RATE = 100.0  # tokens/s of each paced job
CORE_SATURATED = 0.9
"""A process using this share of a core or more is the limit of a measure."""


@dataclass(frozen=True)
class Sizes:
    alone: int  # chunks through the bus alone
    per_shard: int  # jobs (and tags) per master end to end
    e2e: int  # chunks per job end to end
    hot_jobs: int  # jobs feeding the hot tag
    paced_s: float  # seconds each paced job lasts
    rounds: int  # best of, per side and per run


QUICK = Sizes(alone=6_000, per_shard=1, e2e=1_000, hot_jobs=6, paced_s=1.0, rounds=1)
FULL = Sizes(alone=60_000, per_shard=2, e2e=8_000, hot_jobs=12, paced_s=5.0, rounds=2)


@dataclass(frozen=True)
class Deployments:
    single: Streams
    cluster: Streams
    replicated: Streams
    replicated_cluster: Streams
    owner: Callable[[str], int]
    """The cluster master (index in ``cluster.masters``) serving a hash tag's slot."""
    replicated_owner: Callable[[str], int]
    """The same for ``replicated_cluster``."""


@contextlib.asynccontextmanager
async def deployments() -> AsyncIterator[Deployments]:
    """The scenario's own servers, started and stopped here."""
    single, primary = RedisServerProcess(), RedisServerProcess()
    replica = RedisServerProcess(extra_args=("--replicaof", "127.0.0.1", str(primary.port)))
    cluster = RedisClusterProcesses(masters=MASTERS, replicas=0)
    # a node silent for a second would be failed over: not on a machine this busy
    replicated_cluster = RedisClusterProcesses(masters=MASTERS, replicas=1, node_timeout_ms=15_000)
    servers: list[RedisServerProcess | RedisClusterProcesses] = []
    try:
        for server in (single, primary, replica, cluster, replicated_cluster):
            await asyncio.to_thread(server.start)
            servers.append(server)
        await asyncio.to_thread(wait_replicated, primary)
        await asyncio.to_thread(replicated_cluster.wait_synced)
        async with slot_map(cluster) as (streams, owner), slot_map(replicated_cluster) as (replicated, owner2):
            yield Deployments(
                single=Streams(single.url, (single.url,)),
                cluster=streams,
                replicated=Streams(primary.url, (primary.url,)),
                replicated_cluster=replicated,
                owner=owner,
                replicated_owner=owner2,
            )
    finally:
        for server in reversed(servers):
            server.close()


@contextlib.asynccontextmanager
async def slot_map(cluster: RedisClusterProcesses) -> AsyncIterator[tuple[Streams, Callable[[str], int]]]:
    """A started cluster's streams (the CPU counted that of its masters) and the master (index in
    their ``masters``) serving a hash tag's slot."""
    client = RedisCluster.from_url(cluster.url)  # its map of the slots (none move here)
    try:
        await client.initialize()
        primaries = {node.port for node in client.get_primaries()}
        masters = [node for node in cluster.nodes if node.port in primaries]
        ports = [node.port for node in masters]

        def owner(name: str) -> int:
            node = client.get_node_from_key(name)  # (the slot of ``name`` is that of ``{name}``)
            assert node is not None
            return ports.index(node.port)

        yield Streams(cluster.url, tuple(node.url for node in masters), cluster=True), owner
    finally:
        await client.aclose()


def spread(owner: Callable[[str], int], candidates: Iterable[str], shards: int, per_shard: int) -> list[str]:
    """``per_shard`` names for each of ``shards`` shards, taken from ``candidates`` in order and
    dealt shard by shard (the ``k``-th name is on shard ``k % shards``)."""
    picked: list[list[str]] = [[] for _ in range(shards)]
    for name in candidates:
        shard = owner(name)
        if len(picked[shard]) < per_shard:
            picked[shard].append(name)
        if all(len(names) == per_shard for names in picked):
            return [names[k] for k in range(per_shard) for names in picked]
    raise ValueError(f"the candidates do not give {per_shard} names on each of {shards} shards")


def fresh_names(stem: str) -> Iterable[str]:
    """Names never used before (arq's job keys outlive a measure)."""
    run = uuid.uuid4().hex[:8]
    i = 0
    while True:
        yield f"{stem}{run}-{i}"
        i += 1


async def scaleout(bench: Bench) -> None:
    sizes = QUICK if bench.quick else FULL
    async with deployments() as places:
        for run in range(bench.runs):
            print(f"scaleout run {run + 1}/{bench.runs}", file=sys.stderr)
            await single_vs_cluster(bench, places, sizes, run)
            await coalescing(bench, places, sizes, run)
            await hot_tag(bench, places, sizes, run)
            await wait_cost(bench, places, sizes, run)


def best(measures: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return max(measures, key=lambda m: float(m["rate"]))


def alternate(sides: Sequence[T], turn: int) -> list[T]:
    """``sides`` in order on even turns, reversed on odd ones: neither side always goes first
    (the first measure after a deployment's start, or after another scenario, runs colder)."""
    return list(sides) if turn % 2 == 0 else list(reversed(sides))


async def single_vs_cluster(bench: Bench, places: Deployments, sizes: Sizes, run: int) -> None:
    """The same jobs and tags on the single Redis and on the cluster, alternating."""
    for what in ("bus_alone_custom", "messages", "custom"):
        measured: dict[str, list[dict[str, Any]]] = {"single": [], "cluster": []}
        for round_ in range(sizes.rounds):
            # each job's tag on the next shard: a chunk's two entries go to two masters
            tags = spread(places.owner, (f"t{i}" for i in range(10_000)), MASTERS, sizes.per_shard)
            tags = tags[1:] + tags[:1]
            sides = [("single", places.single), ("cluster", places.cluster)]
            for side, streams in alternate(sides, run + round_):
                # the job ids themselves spread (a job stream's slot is its id's), one set per side
                jobs = spread(places.owner, fresh_names(f"{side}-j"), MASTERS, sizes.per_shard)
                if what == "bus_alone_custom":
                    m = await bus_alone(bench, "custom", sizes.alone, streams=streams, tags=tags, jobs=jobs)
                    m["worker_us"] = m["publisher_us"]
                else:
                    inputs = [{"n": sizes.e2e, "tag": tag} for tag in tags]
                    m = await tokenbus_e2e(
                        bench, f"bench_{what}", inputs, what, len(jobs), streams=streams, tags=tags,
                        job_ids=jobs,
                    )  # fmt: skip
                measured[side].append(m)
        single, cluster = best(measured["single"]), best(measured["cluster"])
        for side, m in (("single", single), ("cluster", cluster)):
            bench.record(f"scaleout_{side}_{what}_chunks_per_s", m["rate"])
            bench.record(f"cpu_worker_us_per_chunk_scaleout_{side}_{what}", m["worker_us"])
            bench.record(f"cpu_redis_us_per_chunk_scaleout_{side}_{what}", m["redis_us"])
            bench.record(f"cpu_consumer_us_per_chunk_scaleout_{side}_{what}", m["consumer_us"])
        bench.record(f"cpu_redis_us_per_chunk_per_shard_scaleout_cluster_{what}", cluster["redis_us"] / MASTERS)
        for rank, share in enumerate(cluster["redis_shares"], 1):
            bench.record(f"scaleout_cluster_{what}_redis_share_shard_rank{rank}", share)
        bench.record(f"ratio_cluster_vs_single_{what}_chunks_per_s", cluster["rate"] / single["rate"])
        bench.record(f"ratio_cluster_vs_single_{what}_worker_cpu", cluster["worker_us"] / single["worker_us"])
        bench.record(f"ratio_cluster_vs_single_{what}_redis_cpu", cluster["redis_us"] / single["redis_us"])


async def coalescing(bench: Bench, places: Deployments, sizes: Sizes, run: int) -> None:
    """Coalescing on vs off on the single Redis: at saturation, and at 20 paced jobs."""
    streams, after = places.single, bench.settings().coalesce_after
    overrides = {"on": {"TOKENBUS_COALESCE": "adaptive"}, "off": {"TOKENBUS_COALESCE": "off"}}
    alone: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    e2e: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    floor_rate = 0.0
    jobs = 4
    for round_ in range(sizes.rounds):
        count, seconds = await floor(custom, {"n": sizes.e2e * jobs}, "custom")
        floor_rate = max(floor_rate, count / seconds)
        for side in alternate(("off", "on"), run + round_):
            alone[side].append(
                await bus_alone(
                    bench, "custom", sizes.alone, streams=streams, coalesce_after=after if side == "on" else None
                )
            )
            e2e[side].append(
                await tokenbus_e2e(
                    bench, "bench_custom", {"n": sizes.e2e}, "custom", jobs, streams=streams, overrides=overrides[side]
                )
            )
    bench.record("scaleout_floor_custom_chunks_per_s", floor_rate)
    for what, measures, part in (("bus_alone_custom", alone, "publisher"), ("custom", e2e, "worker")):
        on, off = best(measures["on"]), best(measures["off"])
        for side, m in (("on", on), ("off", off)):
            bench.record(f"scaleout_coalesce_{side}_{what}_chunks_per_s", m["rate"])
            bench.record(f"scaleout_coalesce_{side}_{what}_entries_per_chunk", m["entries_per_chunk"])
            for cpu in ("redis", "consumer", part):
                bench.record(f"cpu_{cpu}_us_per_chunk_scaleout_coalesce_{side}_{what}", m[f"{cpu}_us"])
        bench.record(f"ratio_coalesce_on_vs_off_{what}_chunks_per_s", on["rate"] / off["rate"])
        bench.record(f"ratio_coalesce_on_vs_off_{what}_entries", on["entries_per_chunk"] / off["entries_per_chunk"])
        for cpu in ("redis", "consumer", part):
            bench.record(f"ratio_coalesce_on_vs_off_{what}_{cpu}_cpu", on[f"{cpu}_us"] / off[f"{cpu}_us"])
    for side in ("off", "on"):
        bench.record(f"ratio_custom_coalesce_{side}_vs_floor", best(e2e[side])["rate"] / floor_rate)
    p99s: dict[str, float] = {}
    for side in alternate(("off", "on"), run):
        n = int(RATE * sizes.paced_s)
        (p50, p99, _), _ = await paced_tokenbus(bench, PACED_JOBS, n, RATE, streams=streams, overrides=overrides[side])
        bench.record(f"latency_scaleout_coalesce_{side}_{PACED_JOBS}jobs_p50_ms", p50)
        bench.record(f"latency_scaleout_coalesce_{side}_{PACED_JOBS}jobs_p99_ms", p99)
        p99s[side] = p99
    bench.record(f"ratio_coalesce_on_vs_off_{PACED_JOBS}jobs_p99", p99s["on"] / p99s["off"])


async def hot_tag(bench: Bench, places: Deployments, sizes: Sizes, run: int) -> None:
    """One tag stream on one master, fed by many jobs whose job streams spread over the masters."""
    streams, after = places.cluster, bench.settings().coalesce_after
    hot = places.owner("hot")
    measures: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for round_ in range(sizes.rounds):
        for side in alternate(("off", "on"), run + round_):
            jobs = spread(places.owner, fresh_names("h"), MASTERS, -(-sizes.hot_jobs // MASTERS))
            measures[side].append(
                await bus_alone(
                    bench, "custom", sizes.alone, streams=streams, tags=("hot",), jobs=jobs,
                    coalesce_after=after if side == "on" else None,
                )
            )  # fmt: skip
    for side in ("off", "on"):
        m = best(measures[side])
        master_core, publisher_core = m["redis_core"][hot], m["publisher_core"]
        name = f"scaleout_hot_tag_coalesce_{side}"
        bench.record(f"{name}_chunks_per_s", m["rate"])
        bench.record(f"{name}_master_core_share", master_core)
        bench.record(f"{name}_publisher_core_share", publisher_core)
        bench.record(f"{name}_consumer_core_share", m["consumer_core"])
        bench.record(f"{name}_entries_per_chunk", m["entries_per_chunk"])
        # chunks per CPU second of the tag's master: its ceiling with a core of its own
        bench.record(f"{name}_master_capacity_chunks_per_s", m["rate"] / max(master_core, 1e-9))
        limit = (
            "redis (the tag's master)" if master_core >= CORE_SATURATED
            else "the publisher (one process)" if publisher_core >= CORE_SATURATED
            else "the consumer (one process)" if m["consumer_core"] >= CORE_SATURATED
            else "neither at a full core: the machine's cores are shared (2 vCPUs)"
        )  # fmt: skip
        bench.notes.setdefault(f"{name}_limit", []).append(
            f"{limit}: master {master_core:.2f}, publisher {publisher_core:.2f}, consumer {m['consumer_core']:.2f}"
            " of a core"
        )


async def wait_cost(bench: Bench, places: Deployments, sizes: Sizes, run: int) -> None:
    """``TOKENBUS_WAIT_REPLICAS`` 0 against 1 on a Redis with one replica, and on a cluster whose
    masters have one each (every master's pipeline ends with its own ``WAIT``: the jobs and their
    tags spread over the masters, as in :func:`single_vs_cluster`)."""
    await wait_pair(bench, "", places.replicated, sizes, run)
    jobs = spread(places.replicated_owner, fresh_names("w"), MASTERS, sizes.per_shard)
    tags = spread(places.replicated_owner, (f"t{i}" for i in range(10_000)), MASTERS, sizes.per_shard)
    await wait_pair(bench, "cluster_", places.replicated_cluster, sizes, run, jobs=jobs, tags=tags[1:] + tags[:1])


async def wait_pair(
    bench: Bench,
    where: str,
    streams: Streams,
    sizes: Sizes,
    run: int,
    *,
    jobs: Sequence[str] = ("alone",),
    tags: Sequence[str] = ("bench",),
) -> None:
    """``TOKENBUS_WAIT_REPLICAS`` 0 against 1 on ``streams``, alternating: the bus alone (chunks/s,
    best of ``sizes.rounds``) and 20 paced jobs (p99). ``where`` goes in the figures' names."""
    rates: dict[int, list[float]] = {0: [], 1: []}
    for round_ in range(sizes.rounds):
        for replicas in alternate((0, 1), run + round_):
            m = await bus_alone(
                bench, "custom", sizes.alone, streams=streams, jobs=jobs, tags=tags, wait_replicas=replicas
            )
            rates[replicas].append(m["rate"])
    p99s: dict[int, float] = {}
    for replicas in alternate((0, 1), run):
        bench.record(f"scaleout_{where}wait{replicas}_bus_alone_custom_chunks_per_s", max(rates[replicas]))
        (_, p99, _), _ = await paced_tokenbus(
            bench, PACED_JOBS, int(RATE * sizes.paced_s), RATE, streams=streams,
            overrides={"TOKENBUS_WAIT_REPLICAS": replicas},
        )  # fmt: skip
        bench.record(f"latency_scaleout_{where}wait{replicas}_{PACED_JOBS}jobs_p99_ms", p99)
        p99s[replicas] = p99
    bench.record(f"ratio_{where}wait1_vs_wait0_bus_alone_custom_chunks_per_s", max(rates[1]) / max(rates[0]))
    bench.record(f"ratio_{where}wait1_vs_wait0_{PACED_JOBS}jobs_p99", p99s[1] / p99s[0])
