"""Which entries a reader passes on: the newest attempt of each job, each entry once."""

from __future__ import annotations

from tests.support import entry
from tokenbus.consumer.attempts import AttemptFilter, Restart
from tokenbus.schemas.entries import Entry, EntryType

TAG_STREAMS = {"A": "a", "B": "b"}
"""Two followed tag streams, ``A`` of tag ``a`` and ``B`` of tag ``b``."""


def token(seq: int, attempt: int = 1, stream: str = "J", tags: tuple[str, ...] = ("a",), job: str = "j") -> Entry:
    return entry(EntryType.TOKEN, job, seq, attempt, tags=tags, stream=stream)


def end(seq: int, attempt: int = 1, stream: str = "J", retry: bool = False) -> Entry:
    return entry(EntryType.END, "j", seq, attempt, stream=stream, retry=retry)


def passed(attempts: AttemptFilter, entries: list[Entry]) -> list[tuple[str | None, int, int]]:
    return [(e.stream, e.attempt, e.seq) for e in entries if attempts.accept(e)]


def test_a_newer_attempt_restarts_the_job_and_the_older_ones_are_dropped() -> None:
    attempts = AttemptFilter()
    assert attempts.accept(token(0)) is True  # the first attempt seen is no restart
    assert attempts.accept(token(1)) is True
    restart = attempts.accept(token(0, attempt=3))
    assert restart == Restart("j", 3, 1)
    assert str(restart) == "job j: attempt 1 was interrupted; attempt 3 starts over"
    assert not attempts.accept(token(2, attempt=1))  # the interrupted worker's late entries
    assert not attempts.accept(token(5, attempt=2))
    assert attempts.accept(token(1, attempt=3)) is True
    assert attempts.accept(token(0, job="other")) is True  # jobs are apart


def test_a_replay_that_expects_the_newest_attempt_skips_older_ones_without_a_restart() -> None:
    attempts = AttemptFilter()
    attempts.expect("j", 2)
    assert passed(attempts, [token(0), token(1), end(2, retry=True), token(0, attempt=2), token(1, attempt=2)]) == [
        ("J", 2, 0), ("J", 2, 1),
    ]  # fmt: skip


def test_entries_written_twice_by_a_retried_batch_are_passed_once_per_stream() -> None:
    attempts = AttemptFilter()
    written = [token(0), token(1), token(2), token(1), token(2), token(3), token(1, stream="T"), token(3, stream="T")]
    assert passed(attempts, written) == [("J", 1, 0), ("J", 1, 1), ("J", 1, 2), ("J", 1, 3), ("T", 1, 1), ("T", 1, 3)]


def test_a_chunk_in_two_followed_tag_streams_is_passed_once_whichever_comes_first() -> None:
    attempts = AttemptFilter(TAG_STREAMS)
    both = ("a", "b")
    # the job's chunks: 0 and 3 tagged a and b (in A and B), 1 tagged a, 2 tagged b, 4 tagged a and c
    # (c is not followed: A holds the only copy); 5 the terminal entry, in both streams
    read = [
        token(0, stream="A", tags=both), token(1, stream="A"), token(0, stream="B", tags=both),
        token(2, stream="B", tags=("b",)), token(3, stream="B", tags=both), token(3, stream="A", tags=both),
        token(4, stream="A", tags=("a", "c")), end(5, stream="B"), end(5, stream="A"),
    ]  # fmt: skip
    assert passed(attempts, read) == [("A", 1, 0), ("A", 1, 1), ("B", 1, 2), ("B", 1, 3), ("A", 1, 4), ("B", 1, 5)]


def test_copies_are_recognised_after_the_filter_forgot_them() -> None:
    """The memory kept for copies still to come is bounded per job; past it, a stream that has gone
    past a chunk's seq tells that the chunk was passed on. A chunk trimmed from one stream before it
    was read is still passed on from the other."""

    def chunk(stream: str, seq: int) -> Entry:
        return token(seq, stream=stream, tags=("a", "b"))

    lagging = AttemptFilter(TAG_STREAMS, max_copies=2)
    assert all(lagging.accept(chunk("B", seq)) for seq in range(1, 11))
    assert not any(lagging.accept(chunk("A", seq)) for seq in range(1, 11))

    trimmed = AttemptFilter(TAG_STREAMS, max_copies=2)
    assert all(trimmed.accept(chunk("A", seq)) for seq in range(5, 11))  # 1..4 were trimmed from A
    assert [seq for seq in range(1, 11) if trimmed.accept(chunk("B", seq))] == [1, 2, 3, 4]


def test_unordered_readers_drop_only_superseded_attempts() -> None:
    """Consumer groups: a claimed entry arrives late, and a redelivery is the group's at-least-once."""
    attempts = AttemptFilter(ordered=False)
    assert passed(attempts, [token(2), token(1), token(2), token(0, attempt=2), token(3)]) == [
        ("J", 1, 2), ("J", 1, 1), ("J", 1, 2), ("J", 2, 0),
    ]  # fmt: skip
    assert attempts.accept(token(1, attempt=2)) is True


def test_past_max_jobs_the_job_seen_least_recently_is_forgotten() -> None:
    attempts = AttemptFilter(max_jobs=2)
    for seq, job in enumerate(("x", "y", "x", "z")):  # x seen again after y: y is the least recent
        assert attempts.accept(token(seq, attempt=2, job=job))
    assert attempts.accept(token(9, attempt=1, job="x")) is False  # x is remembered at attempt 2
    assert attempts.accept(token(9, attempt=1, job="y")) is True  # y was forgotten: attempt 1 is new again
