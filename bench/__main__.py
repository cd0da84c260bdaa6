"""The tokenbus benchmark harness. ``./dev bench`` (full) or ``./dev bench --quick`` (seconds, for CI).

Every figure is measured in one run next to its baseline (same machine, same minute), repeated
``--runs`` times, and reported as min / median / max. Results go to ``bench/results/latest.json``
and, as a Markdown table, to stdout. Each scenario is a module of this package; ``--only NAME``
(repeatable) runs some of them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import statistics
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import uvloop

from bench.decode import consumer_decode
from bench.harness import RESULTS, Bench
from bench.latency import latency
from bench.memory import memory
from bench.pickup import pickup
from bench.profiling import profile
from bench.scaleout import scaleout
from bench.scaling import scaling
from bench.throughput import throughput
from tokenbus.redis_server import RedisServerProcess
from tokenbus.worker.app import tune_gc
from tokenbus.worker.offline_model import OfflineModelServer

SCENARIOS: dict[str, Callable[[Bench], Awaitable[None]]] = {
    "throughput": throughput,
    "latency": latency,
    "pickup": pickup,
    "consumer": consumer_decode,
    "memory": memory,
    "scaling": scaling,
    "scaleout": scaleout,
    "profile": profile,
}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    # SIGTERM (a CI timeout, `kill`) stops the run as Ctrl-C does: the scenarios' `finally` blocks
    # stop the worker processes and the Redis server they started, instead of leaving them running
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    # the worker runs in this process: floors and workers alike run with the worker's GC settings
    tune_gc()
    server = RedisServerProcess()
    server.start()
    try:
        async with OfflineModelServer() as model:
            bench = Bench(server.url, model.base_url, args.quick, args.runs)
            try:
                for name in args.only or SCENARIOS:
                    print(f"== {name}", file=sys.stderr, flush=True)
                    await SCENARIOS[name](bench)
            finally:
                for proc in bench.consumers:
                    if proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
                            proc.kill()
                        await proc.wait()
    finally:
        server.close()
    summary = {
        name: {"min": min(v), "median": statistics.median(v), "max": max(v), "runs": v}
        for name, v in bench.results.items()
    }
    return {
        "command": " ".join(sys.argv),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
        },
        "results": summary,
        "notes": bench.notes,
    }


def table(report: dict[str, Any]) -> str:
    lines = ["| measure | min | median | max |", "|---|---:|---:|---:|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['min']:,.2f} | {r['median']:,.2f} | {r['max']:,.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="small sizes, one run: proves the harness works")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", action="append", choices=list(SCENARIOS))
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.runs = 1
    try:
        report = uvloop.run(main(arguments))
    except asyncio.CancelledError:
        sys.exit("stopped (SIGTERM): no results written")
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(table(report))
