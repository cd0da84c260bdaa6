"""The gateway benchmark still runs (a few jobs, a few clients, seconds). Figures are not asserted:
see BENCHMARKS.md."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

from bench.gateway import ceiling, percentiles
from bench.gateway_readers import bucket

ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(200)
def test_quick_gateway_benchmark_runs_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "gateway.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.gateway", "--quick", "--out", str(out), "--compare", f"same={ROOT}"],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = orjson.loads(out.read_bytes())["results"]
    for side in ("gateway", "gateway_same", "subscribe"):
        for measure in ("events_per_s", "p99_ms", "cpu_us_per_event"):
            assert results[f"{side}_3j_2c_{measure}"]["min"] > 0, f"{side}_3j_2c_{measure}"
        assert results[f"{side}_3j_2c_missing"]["max"] == 0  # every token reached every reader
    for name in [
        "added_p99_ms_gateway_3j_2c", "ratio_cpu_per_event_gateway_vs_gateway_same_3j_2c",
        "ceiling_gateway_fanout_events_per_s", "ceiling_gateway_jobs_events_per_s", "idle_kb_per_connection",
        "idle_rss_growth_mb_over_beats",
    ]:  # fmt: skip
        assert name in results, f"{name} missing from {sorted(results)}"
    assert results["idle_lost_connections_after_3beats"]["max"] == 0


def test_a_ceiling_is_the_load_before_the_first_whose_p99_passes() -> None:
    assert ceiling({2500: 3.0, 25000: 24.9, 50000: 25.1, 100000: 12.0}) == 25000  # a later pass does not count
    assert ceiling({2500: 30.0, 5000: 1.0}) == 0
    assert ceiling({5000: 1.0, 2500: 2.0}) == 5000  # by load, whatever the order measured


def test_percentiles_of_a_latency_histogram() -> None:
    latencies_ms = [1.0] * 985 + [20.0] * 14 + [300.0]
    histogram = Counter(bucket(int(ms * 1e6)) for ms in latencies_ms)
    p50, p99, top = percentiles(histogram)
    assert 1.0 <= p50 <= 1.01
    assert 20.0 <= p99 <= 20.01  # 10 µs buckets below 100 ms
    assert 300.0 <= top <= 301.0  # 1 ms buckets above
