"""The benchmark harness still runs (small sizes). Figures are not asserted: see BENCHMARKS.md."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.__main__ import SCENARIOS
from bench.latency import paced_ceiling
from bench.scaleout import alternate, fresh_names, slot_map, spread
from tokenbus.redis_server import RedisClusterProcesses
from tokenbus.schemas.keys import StreamKeys

ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.e2e


def quick_run(tmp_path: Path, only: list[str], timeout_s: float) -> dict[str, Any]:
    """``python -m bench --quick --only ...``: the report, its figures checked for what any run holds."""
    out = tmp_path / "bench.json"
    # a session of its own: a run that overstays is stopped with everything it started (its worker,
    # consumer and redis-server processes), not only the harness
    with subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), *[a for name in only for a in ("--only", name)]],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    ) as bench:  # fmt: skip
        try:
            _, stderr = bench.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.communicate()
            raise
    assert bench.returncode == 0, stderr[-3000:]
    report: dict[str, Any] = orjson.loads(out.read_bytes())
    # A paced ceiling is 0 when even one job misses its deadline, as on a machine busy with other
    # work; memory growth may be negative (the worker gave memory back).
    ceilings = ("paced_ceiling_", "ratio_paced_ceiling_")
    results = {name: r for name, r in report["results"].items() if not name.startswith("memory_")}
    assert all(r["min"] > 0 for name, r in results.items() if not name.startswith(ceilings)), results
    assert all(r["min"] >= 0 for r in results.values()), results
    return report


@pytest.mark.timeout(300)
def test_quick_benchmark_runs_every_scenario(tmp_path: Path) -> None:
    # not scaleout: its own deployments (a cluster, a replica) take minutes on a busy machine; its
    # parts are unit-tested below, and `./dev bench --only scaleout --quick` runs it whole
    report = quick_run(tmp_path, [name for name in SCENARIOS if name != "scaleout"], 280)
    names = set(report["results"])
    for expected in [
        "ratio_messages_vs_floor", "ratio_custom_vs_floor", "ratio_joke_poem_http_vs_floor", "ratio_messages_vs_naive",
        "latency_tokenbus_20jobs_p99_ms", "latency_nosink_20jobs_p99_ms", "cpu_worker_us_per_chunk_messages",
        "ratio_consumer_api_vs_raw", "memory_worker_rss_growth_mb",
        "ratio_messages_producer_vs_floor", "scaling_messages_2proc_chunks_per_s", "scaling_custom_2proc_chunks_per_s",
        "ratio_joke_poem_http_without_arq_vs_floor", "pickup_announced_p50_ms", "pickup_polled_p50_ms",
        "ratio_joke_poem_http_vs_staggered_floor", "latency_nosink_without_astream_20jobs_from_due_p99_ms",
        "latency_tokenbus_20jobs_from_due_p99_ms",
        "floor_custom_without_astream_chunks_per_s", "paced_ceiling_tokenbus_jobs", "paced_ceiling_nosink_jobs",
        "ratio_paced_ceiling_tokenbus_vs_nosink", "paced_ceiling_nosink_without_astream_from_due_jobs",
        "ratio_paced_ceiling_tokenbus_vs_nosink_of_medians", "ratio_bus_alone_messages_vs_floor",
        "ratio_bus_alone_custom_vs_floor",
    ]:  # fmt: skip
        assert expected in names, f"{expected} missing from {sorted(names)}"
    assert (ROOT / "bench" / "results" / "profile.txt").exists()


def test_a_paced_ceiling_is_the_load_before_the_first_that_falls_behind() -> None:
    assert paced_ceiling({1: 0.2, 300: 24.9, 350: 25.1, 400: 12.0}) == 300  # a later pass does not count
    assert paced_ceiling({1: 30.0, 20: 1.0}) == 0
    assert paced_ceiling({20: 1.0, 1: 2.0}) == 20  # by load, whatever the order measured


def test_spread_deals_names_shard_by_shard_in_candidate_order() -> None:
    owner = {"a": 0, "b": 0, "c": 1, "d": 2, "e": 1, "f": 2, "g": 0}.__getitem__
    assert spread(owner, "abcdefg", 3, 1) == ["a", "c", "d"]
    assert spread(owner, "abcdefg", 3, 2) == ["a", "c", "d", "b", "e", "f"]
    with pytest.raises(ValueError, match="2 names on each of 3 shards"):
        spread(owner, "abcd", 3, 2)  # shard 1 and 2 get one each


def test_alternate_puts_each_side_first_every_other_turn() -> None:
    assert alternate(("off", "on"), 0) == ["off", "on"]
    assert alternate(("off", "on"), 1) == ["on", "off"]
    assert alternate(("off", "on"), 2) == ["off", "on"]


async def test_spread_job_ids_put_each_job_stream_on_the_master_its_owner_says(
    redis_cluster: RedisClusterProcesses,
) -> None:
    # a job stream's slot is that of its id as written (scaleout's WAIT and single-vs-cluster
    # measures rely on it), and a cluster's streams count its masters only, not their replicas
    async with slot_map(redis_cluster) as (streams, owner):
        jobs = spread(owner, fresh_names("cluster-j"), 3, 2)
        keys = StreamKeys("b1234567")
        served = [redis_cluster.master_of(keys.job(job)).url for job in jobs]
    assert len(redis_cluster.nodes) == 6
    assert served == [streams.masters[k % 3] for k in range(6)]
