"""The ``profile`` scenario: where the worker's time goes per chunk (cProfile of a messages job)."""

from __future__ import annotations

import cProfile
import io
import pstats

from bench.harness import RESULTS, Bench, tokenbus_e2e


async def profile(bench: Bench) -> None:
    """Where the worker's time goes per chunk (messages mode, cProfile, top functions by own time)."""
    profiler = cProfile.Profile()
    profiler.enable()
    await tokenbus_e2e(bench, "bench_messages", {"n": 5_000 if bench.quick else 20_000}, "messages")
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "profile.txt").write_text(out.getvalue())
