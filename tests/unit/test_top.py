"""``tokenbus top`` without Redis or a terminal: rates between samples, and what a view shows."""

from __future__ import annotations

from rich.console import Console

from tokenbus.consumer.groups import GroupStats
from tokenbus.top import render
from tokenbus.top_data import JobSample, Rates, Snapshot, StreamInfo, TagSample
from tokenbus.worker.presence import WorkerInfo
from tokenbus.worker.settings import Settings
from tokenbus.worker.status import JobState, JobStatus

NOW_MS = 1_800_000_000_000


def test_a_rate_is_the_increase_over_the_time_between_two_samples() -> None:
    rates: Rates[str] = Rates()
    assert rates.update({"a": 10}, now=100.0) == {"a": None}  # nothing to compare with yet
    assert rates.update({"a": 30, "b": 5}, now=102.0) == {"a": 10.0, "b": None}
    assert rates.update({"a": 30, "b": 5}, now=103.0) == {"a": 0.0, "b": 0.0}


def test_a_counter_that_went_down_or_a_key_that_left_starts_over() -> None:
    rates: Rates[str] = Rates()
    rates.update({"a": 50, "b": 1}, now=1.0)
    assert rates.update({"a": 3}, now=2.0) == {"a": None}  # a stream made anew: no negative rate
    assert rates.update({"a": 7, "b": 9}, now=4.0) == {"a": 2.0, "b": None}  # b was forgotten while gone
    assert rates.update({"a": 9}, now=4.0) == {"a": None}  # no time between: no rate, not a division by zero


def snapshot(**overrides: object) -> Snapshot:
    worker = WorkerInfo(
        id="w1", host="box", pid=42, queue="q", graphs=("joke_poem",), max_jobs=4, running=1,
        started_ms=NOW_MS - 60_000, seen_ms=NOW_MS, heartbeat_ms=5000,
    )  # fmt: skip
    running = JobStatus(
        "job-running", JobState.RUNNING, graph="joke_poem", attempt=2, entries=120, worker="box:42",
        enqueued_ms=NOW_MS - 12_500,
    )  # fmt: skip
    failed = JobStatus(
        "job-failed", JobState.ERROR, graph="joke_poem", attempt=1, ended_ms=NOW_MS - 3_000,
        error="the model\nanswered 500", error_type="model_error",
    )  # fmt: skip
    values: dict[str, object] = {
        "taken_ms": NOW_MS, "running": [JobSample(running, 37.5)], "more_running": False, "queued": 3,
        "workers": [worker],
        "tags": [
            TagSample("quiet", "p:tag:{quiet}", StreamInfo(5, 5, f"{NOW_MS - 90_000}-0", 0), 0.0),
            TagSample("poem", "p:tag:{poem}", StreamInfo(900, 4000, f"{NOW_MS - 100}-0", 1), 21.25),
            TagSample("new", "p:tag:{new}", StreamInfo(1, 1, f"{NOW_MS}-0", 0), None),
        ],
        "tags_found": 3, "tags_complete": True,
        "groups": [GroupStats("p:tag:{poem}", "billing", 2, 7, 130, f"{NOW_MS - 5000}-0")],
        "errors": [failed],
    }  # fmt: skip
    values.update(overrides)
    return Snapshot(**values)  # type: ignore[arg-type]


def shown(view: Snapshot, width: int = 160) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(render(view, settings=Settings(TOKENBUS_PREFIX="p", TOKENBUS_QUEUE="q"), interval=1.0))
    return [line.rstrip() for line in console.export_text().splitlines()]


def row(lines: list[str], first: str) -> list[str]:
    [line] = [line for line in lines if line.split()[:1] == [first]]
    return line.split()


def test_the_view_shows_jobs_tags_groups_and_errors() -> None:
    lines = shown(snapshot())
    assert "1 live worker (4 slots)  1 running  3 queued  37.5 tok/s" in lines[0]
    assert row(lines, "job-running") == ["job-running", "joke_poem", "2", "box:42", "12.5s", "120", "37.5"]
    tags = [line.split()[0] for line in lines if line.split()[:1] in (["poem"], ["quiet"], ["new"])]
    assert tags == ["poem", "new", "quiet"]  # the busiest first
    assert row(lines, "poem") == ["poem", "900", "21.2", "0.1s", "ago"]
    assert row(lines, "new")[2] == "…"  # first seen: no rate yet
    assert row(lines, "p:tag:{poem}") == ["p:tag:{poem}", "billing", "2", "7", "130"]
    error = ["job-failed", "joke_poem", "3.0s", "ago", "model_error:", "the", "model", "answered", "500"]
    assert row(lines, "job-failed") == error  # on one line


def test_an_idle_deployment_says_so_and_shows_no_groups_table() -> None:
    lines = shown(snapshot(running=[], workers=[], tags=[], tags_found=0, groups=[], errors=[]))
    assert "0 live workers (0 slots)  0 running  3 queued  0.0 tok/s" in lines[0]
    assert sum(line.strip() == "(none)" for line in lines) == 3  # jobs, tags, errors
    assert not any("Consumer groups" in line for line in lines)


def test_a_cut_short_list_says_what_it_leaves_out() -> None:
    lines = shown(snapshot(more_running=True, tags_found=45, tags_complete=False))
    assert " more run: the 1 oldest are shown (--limit)" in lines
    assert (
        " the 3 written to last of 45 found are shown; the search for tag streams stopped at its budget: "
        "there may be more (--tag names them)"
    ) in lines
