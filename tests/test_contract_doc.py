"""schemas/CONTRACT.md, the contract other languages rely on, checked against the code: every
field, entry type, error type, key and request field the code has is named there, and the
tables name nothing the code does not have."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix

from tokenbus.schemas.entries import _FIELD_NAMES, COUNT_FIELD, REDRIVE_GROUP, EntryType, ErrorType
from tokenbus.schemas.job import JOB_FUNCTION, JobRequest
from tokenbus.schemas.keys import FINISHED_KEPT, StreamKeys, wake_channel
from tokenbus.worker.presence import WorkerInfo
from tokenbus.worker.serializer import ENVELOPE_FIELDS

CONTRACT = (Path(__file__).resolve().parent.parent / "schemas" / "CONTRACT.md").read_text()
TERMINAL_FIELDS = ("error", "error_type", "retry")


def table_after(heading: str) -> list[str]:
    """The first column (without backticks) of the rows of the first table after ``heading``."""
    section = CONTRACT.split(heading, 1)[1]
    table = section[section.index("\n|") + 1 :].split("\n\n", 1)[0].splitlines()
    return [row.split("|")[1].strip().strip("`") for row in table[2:]]  # past the header and the rule


def test_the_entry_fields_are_the_codes() -> None:
    fields = [name.decode() for name in _FIELD_NAMES] + [COUNT_FIELD] + list(TERMINAL_FIELDS)
    assert table_after("## Entries") == fields


def test_every_entry_type_and_error_type_is_named() -> None:
    for kind in EntryType:
        assert f"`{kind.value}`" in CONTRACT
    assert table_after("Error types of tokenbus's own") == [t.value for t in ErrorType]


def test_the_request_fields_are_the_models() -> None:
    assert table_after("The request (JSON object):") == list(JobRequest.model_fields)


def test_the_envelope_is_the_one_the_worker_reads() -> None:
    envelope = re.search(r"SET arq:job:<job id> '(\{.*\})'", CONTRACT)
    assert envelope is not None
    assert re.findall(r'"(\w+)":', envelope.group(1)) == list(ENVELOPE_FIELDS)
    assert f'"f": "{JOB_FUNCTION}"' in envelope.group(1)


@pytest.mark.parametrize(
    "key",
    [
        StreamKeys("PREFIX").tag("TAG"),
        StreamKeys("PREFIX").job("JOB"),
        StreamKeys("PREFIX").running,
        StreamKeys("PREFIX").sweeping("JOB"),
        StreamKeys("PREFIX").dead_letter,
        StreamKeys("PREFIX").copies("JOB", "GROUP"),
        StreamKeys("PREFIX").finished,
        StreamKeys("PREFIX").workers,
        wake_channel("QUEUE"),
        job_key_prefix + "JOB",
        in_progress_key_prefix + "JOB",
        retry_key_prefix + "JOB",
        result_key_prefix + "JOB",
        abort_jobs_ss,
    ],
)
def test_every_key_the_code_writes_is_in_the_key_table(key: str) -> None:
    placeholders = {"PREFIX": "<prefix>", "TAG": "<tag>", "JOB": "<job id>", "GROUP": "<group>", "QUEUE": "<queue>"}
    for name, placeholder in placeholders.items():
        key = key.replace(name, placeholder)
    assert key in table_after("## Keys")


def test_the_operators_keys_are_described_as_the_code_writes_them() -> None:
    record = re.search(r"`<prefix>:workers` \| hash \|.*?JSON `\{([^}]*)\}`", CONTRACT)
    assert record is not None
    assert re.findall(r'"(\w+)"', record.group(1)) == [f.name for f in dataclasses.fields(WorkerInfo)]
    assert f"the newest {FINISHED_KEPT} finished jobs" in CONTRACT
    assert f"`{REDRIVE_GROUP}`" in CONTRACT
