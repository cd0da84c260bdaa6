"""A consumer in its own process: reads entries through the consumer API and reports.

    python -m bench.consumer URL PREFIX --jobs N [--tag T | --job ID] [--cluster]

Prints one JSON line once N jobs have ended: entries received, the chunks they hold (a merged
entry holds ``n``: ``TOKENBUS_COALESCE``), the receive time of the last terminal entry, latencies
of payloads carrying a ``t`` (when written, seconds since the epoch) and from their ``due`` time
if they carry one, and the CPU time it spent after start-up. ``--cluster``: URL is a node of a
Redis Cluster.
"""

from __future__ import annotations

import argparse
import sys
import time

import orjson
import uvloop
from redis.asyncio import Redis, RedisCluster

from tokenbus.consumer.reader import LATEST
from tokenbus.consumer.subscribe import subscribe
from tokenbus.schemas.entries import Entry


async def run(args: argparse.Namespace) -> dict[str, object]:
    cls = RedisCluster if args.cluster else Redis
    redis: Redis | RedisCluster = cls.from_url(args.url, socket_timeout=None)
    count, chunks, ended, last = 0, 0, 0, 0.0
    latencies: list[float] = []
    from_due: list[float] = []
    kind = {"tags": args.tag} if args.tag else {"jobs": [args.job]}
    cpu0 = time.process_time()  # start-up (imports, connecting) is not per-entry work
    print("ready", flush=True)
    try:
        async for item in subscribe(redis, prefix=args.prefix, start=args.start or LATEST, **kind):
            assert isinstance(item, Entry)
            count += 1
            if not item.is_final:
                chunks += item.n
            if args.latency and item.data and "t" in item.data:
                now = time.time()
                latencies.append(now - item.data["t"])
                if "due" in item.data:
                    from_due.append(now - item.data["due"])
            if item.is_final:
                ended += 1
                if ended >= args.jobs:
                    last = time.time()
                    break
    finally:
        await redis.aclose()
    return {
        "entries": count,
        "chunks": chunks,
        "last": last,
        "latency_ms": percentiles(latencies),
        "from_due_ms": percentiles(from_due),
        "cpu": time.process_time() - cpu0,
    }


def percentiles(values: list[float]) -> tuple[float, float, float] | None:
    """p50, p99 and max in milliseconds (a summary: the raw list would be megabytes on stdout)."""
    if not values:
        return None
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return ordered[len(ordered) // 2] * 1000, p99 * 1000, ordered[-1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("prefix")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--tag", action="append")
    parser.add_argument("--job")
    parser.add_argument("--start")
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--cluster", action="store_true", help="URL is a node of a Redis Cluster")
    result = uvloop.run(run(parser.parse_args()))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
