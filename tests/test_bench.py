"""The benchmark harness still runs (small sizes). Figures are not asserted: see BENCHMARKS.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(300)
def test_quick_benchmark_runs_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=280,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = orjson.loads(out.read_bytes())
    names = set(report["results"])
    for expected in [
        "ratio_messages_vs_floor", "ratio_custom_vs_floor", "ratio_joke_poem_http_vs_floor", "ratio_messages_vs_naive",
        "latency_tokenbus_20jobs_p99_ms", "latency_nosink_20jobs_p99_ms", "cpu_worker_us_per_chunk_messages",
        "ratio_consumer_api_vs_raw", "memory_worker_rss_growth_mb",
        "ratio_messages_producer_vs_floor", "scaling_messages_2proc_chunks_per_s", "scaling_custom_2proc_chunks_per_s",
        "ratio_joke_poem_http_without_arq_vs_floor", "pickup_announced_p50_ms", "pickup_polled_p50_ms",
        "ratio_joke_poem_http_vs_staggered_floor", "latency_nosink_without_astream_20jobs_from_due_p99_ms",
        "latency_tokenbus_20jobs_from_due_p99_ms",
        "floor_custom_without_astream_chunks_per_s",
    ]:  # fmt: skip
        assert expected in names, f"{expected} missing from {sorted(names)}"
    assert all(r["min"] > 0 for name, r in report["results"].items() if not name.startswith("memory_"))
    assert (ROOT / "bench" / "results" / "profile.txt").exists()
