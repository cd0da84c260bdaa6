"""How ``tokenbus tail`` prints: tokens on stdout, lifecycle notices on stderr, or JSON lines."""

from __future__ import annotations

import io

import orjson
import pytest

from tests.support import entry
from tokenbus.consumer.attempts import Restart
from tokenbus.consumer.output import Format, Printer
from tokenbus.consumer.reader import Gap
from tokenbus.gateway.events import gap_event
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.schemas.errors import MalformedEntry

GAP = Gap("t:job:{j}", "0-0", "5-0")


def job(attempt: int = 1) -> list[Entry]:
    return [
        entry(EntryType.START, "j", 0, attempt),
        entry(EntryType.TOKEN, "j", 1, attempt, content="Hello", tags=("poem",), node="n"),
        entry(EntryType.TOKEN, "j", 2, attempt, content="", tags=("poem",), node="n"),  # prints nothing
        entry(EntryType.CUSTOM, "j", 3, attempt, content=" world", data={"content": " world"}),
    ]


def printed(items: list[Entry | Gap | Restart], format: Format = "text", sep: str = "") -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    printer = Printer(out, err, format=format, sep=sep)
    for item in items:
        printer.show(item)
    return out.getvalue(), err.getvalue()


def test_text_puts_tokens_on_stdout_and_the_jobs_lifecycle_on_stderr() -> None:
    failed = entry(EntryType.ERROR, "j", 3, 2, error="boom", error_type="ValueError")
    out, err = printed([GAP, *job(), Restart("j", 2, 1), *job(attempt=2)[:2], failed], sep="|")
    assert out == "Hello| world|Hello|\n"  # an empty token prints nothing, not even the separator
    assert err.splitlines() == [
        f"[tokenbus] {GAP}",
        "[tokenbus] job j: attempt 1 started",
        "[tokenbus] job j: attempt 1 was interrupted; attempt 2 starts over",
        "[tokenbus] job j: attempt 2 started",
        "[tokenbus] job j: attempt 2 error: boom",
    ]


def test_jsonl_prints_every_entry_and_restart_as_one_object_a_line() -> None:
    end = entry(EntryType.END, "j", 4)
    out, err = printed([GAP, *job(), Restart("j", 2, 1), end], format="jsonl", sep="|")
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert lines == [e.to_dict() for e in job()] + [
        {"type": "restart", "job": "j", "attempt": 2, "previous_attempt": 1},
        end.to_dict(),
    ]
    assert lines[3]["data"] == {"content": " world"}
    assert err == f"[tokenbus] {GAP}\n"


def test_jsonl_raises_on_broken_json_before_writing_any_of_the_entry() -> None:
    fields = entry(EntryType.TOKEN, "j", 1, content="x").encode()
    fields[b"meta"] = b'{"not json'
    broken = Entry.decode(fields, id="1-0", stream="t:job:{j}")
    out = io.StringIO()
    with pytest.raises(MalformedEntry, match="meta"):
        Printer(out, io.StringIO(), format="jsonl").show(broken)
    assert out.getvalue() == ""


def test_a_seq_gap_names_the_job_and_the_missing_seqs_on_stderr_and_in_the_gateways_event() -> None:
    gap = Gap("t:job:{j}", "3-0", "9-0", job="j", attempt=2, missing=(4, 8))
    out, err = printed([gap, *job()[:2]])
    assert out == "Hello"
    assert err.splitlines()[0] == "[tokenbus] gap in t:job:{j}: job j attempt 2: seqs 4-8 missing (between 3-0 and 9-0)"
    event = gap_event(gap).decode()
    assert event.startswith("event: gap\r\n") or event.startswith("event: gap\n"), event
    data = orjson.loads(next(line for line in event.splitlines() if line.startswith("data: "))[6:])
    assert data == {
        "type": "gap", "stream": "t:job:{j}", "after": "3-0", "first_available": "9-0", "job": "j", "attempt": 2,
        "missing": [4, 8],
    }  # fmt: skip
    trimmed = orjson.loads(next(line for line in gap_event(GAP).decode().splitlines() if line.startswith("data: "))[6:])
    assert set(trimmed) == {"type", "stream", "after", "first_available"}  # a trimmed resume point, as before
