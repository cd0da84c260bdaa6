"""The public API of each package, pinned: a change to it is a decision, not an accident."""

from __future__ import annotations

import tokenbus.consumer
import tokenbus.schemas
import tokenbus.worker


def test_the_contracts_names() -> None:
    assert tokenbus.schemas.__all__ == [
        "ALL_MODES", "CHUNK_TYPES", "CONTRACT_VERSION", "DEFAULT_PREFIX", "JOB_FUNCTION", "STATE_TYPES", "STREAM_MODES",
        "TERMINAL_TYPES",
        "CancelledEntry", "ClientStateError", "ContractError", "CustomEntry", "EndEntry", "Entry", "EntryType",
        "ErrorEntry", "ErrorType", "GraphLoadError", "InvalidJobId", "InvalidJobRequest", "InvalidTag", "JobRequest",
        "MalformedEntry", "PayloadError", "PublishError", "StartEntry", "StreamKeys", "StreamMode", "TokenEntry",
        "TokenbusError", "UnknownGraph", "UnknownJob", "UnsupportedVersion", "UpdateEntry", "ValuesEntry",
        "validate_job_id", "validate_tag",
    ]  # fmt: skip


def test_the_reading_sides_names() -> None:
    assert tokenbus.consumer.__all__ == [
        "BEGINNING", "LATEST", "REDIS_UNAVAILABLE", "AttemptFilter", "Gap", "GroupConsumer", "GroupStats", "JobView",
        "Restart", "StreamReader", "group_stats", "job_result", "latest_positions", "subscribe",
    ]  # fmt: skip


def test_the_producing_sides_names() -> None:
    assert tokenbus.worker.__all__ == ["Settings", "TokenbusClient"]


def test_every_public_name_is_there() -> None:
    for package in (tokenbus.schemas, tokenbus.consumer, tokenbus.worker):
        missing = [name for name in package.__all__ if not hasattr(package, name)]
        assert missing == [], package.__name__
