"""Exactly-once in effect: per job, keep only the highest attempt and pass each entry once.

arq runs a job at least once; each run is an attempt and starts its ``seq`` at 0. A publisher
that retried a batch may also have written some entries twice, and a chunk with several tags is
copied to the stream of each tag the job fans out (all of them, or those of the job's tag filter),
with the same ``(job, attempt, seq)`` in every copy. :class:`AttemptFilter` sees every entry
once, in stream order, and accepts an entry only if it belongs to the newest attempt of its job
and has not been accepted before, from this stream or another. An entry holds the ``seq``s from
its ``seq`` to ``seq + n - 1`` (``n`` > 1: chunks merged by a congested publisher).

In a job stream an attempt's ``seq``s are contiguous, so one that jumps means entries are missing
(deleted, or lost on the way: a failover, a publisher that gave up): the filter reports it as a
:class:`Gap` with the missing range, for the streams it is told are job streams. Tag streams hold
only the chunks of their tag, so their ``seq``s skip legitimately and are not checked.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Literal

from tokenbus.consumer.reader import Gap
from tokenbus.schemas.entries import TERMINAL_TYPES, Entry

MAX_COPIES_PER_JOB = 1024
"""Chunks of one attempt remembered while a copy of them may still come from another stream."""


@dataclass(frozen=True, slots=True)
class Restart:
    """A newer attempt of ``job`` begins: what was passed on of ``previous_attempt`` is superseded
    (a worker died or shut down mid-job); the job's output starts over with ``attempt``."""

    job: str
    attempt: int
    previous_attempt: int
    type: Literal["restart"] = "restart"

    def __str__(self) -> str:
        return f"job {self.job}: attempt {self.previous_attempt} was interrupted; attempt {self.attempt} starts over"


@dataclass(slots=True)
class _JobState:
    attempt: int
    last_seq: dict[str, int] = field(default_factory=dict)  # per stream: the last seq an entry held
    last_id: str = ""
    """The id of the attempt's last entry in its job stream (checked for contiguity)."""
    terminal: bool = False
    copies: dict[int, tuple[str, ...]] | None = None
    """Chunks passed on that carry 2+ followed tags: seq → followed streams a copy may still come from."""
    first_copy: int = -1
    """The first seq put in ``copies`` (-1: none yet): a stream may have lost the chunks before it
    (trimmed from its head before they were read)."""
    forgotten: int = -1
    """The highest seq whose entry in ``copies`` was dropped before all its copies had come."""


class AttemptFilter:
    """Decides which entries a reader passes on. ``tag_streams`` maps stream key to tag when the
    reader follows several tag streams, so a chunk copied to several of them is passed on once,
    whichever of them holds it. ``ordered=False`` (consumer groups, where claimed entries arrive
    late) only drops superseded attempts: repeated entries are then the at-least-once of groups.
    ``job_streams``: the streams read that are job streams, whose ``seq``s are checked.

    :meth:`accept` returns a :class:`Restart` (truthy) instead of ``True`` for the first entry of a
    newer attempt of a job the reader has passed entries of: the reader's user must start over; and
    a :class:`Gap` (truthy) for an entry of a job stream whose ``seq`` is past the next one: the
    entries between are missing (the entry itself is accepted)."""

    def __init__(
        self,
        tag_streams: dict[str, str] | None = None,
        *,
        job_streams: Collection[str] = (),
        ordered: bool = True,
        max_jobs: int = 100_000,
        max_copies: int = MAX_COPIES_PER_JOB,
    ) -> None:
        self._stream_of_tag = {tag: stream for stream, tag in (tag_streams or {}).items()}
        self._several = len(self._stream_of_tag) > 1
        self._followed: dict[tuple[str, ...], tuple[str, ...]] = {}  # tags → followed streams among them
        self._ordered = ordered
        self._job_streams = frozenset(job_streams)
        self._jobs: OrderedDict[str, _JobState] = OrderedDict()  # least recently seen first
        self._newest: _JobState | None = None  # the last one seen (no need to move it to the end)
        self._max_jobs = max_jobs
        self._max_copies = max_copies

    def expect(self, job: str, attempt: int) -> None:
        """Pass on nothing of ``job`` older than ``attempt`` (a replay that knows the newest attempt
        skips the superseded ones instead of passing them on first)."""
        state = self._jobs.get(job)
        if state is None or state.attempt < attempt:
            self._jobs[job] = _JobState(attempt)

    def accept(self, entry: Entry) -> bool | Restart | Gap:
        job = entry.job
        state = self._jobs.get(job)
        restart: Restart | None = None
        if state is None or entry.attempt > state.attempt:
            if state is not None:
                restart = Restart(job, entry.attempt, state.attempt)
            state = _JobState(entry.attempt)
            self._jobs[job] = state
            if len(self._jobs) > self._max_jobs:
                self._jobs.popitem(last=False)
        elif entry.attempt < state.attempt:
            return False  # a superseded attempt
        elif state is not self._newest:
            self._jobs.move_to_end(job)
        self._newest = state
        if not self._ordered:
            return restart or True
        stream = entry.stream or ""
        seq = entry.seq
        last_seq = state.last_seq
        last = last_seq.get(stream, -1)
        if seq <= last:
            return False  # written twice by a retried batch
        last_seq[stream] = seq + entry.n - 1
        gap: Gap | None = None
        if self._job_streams and stream in self._job_streams:
            if last >= 0 and seq > last + 1:  # (a new attempt's first entry has no last: no restart here)
                gap = Gap(stream, state.last_id, entry.id, job, entry.attempt, (last + 1, seq - 1))
            state.last_id = entry.id or ""
        if entry.type in TERMINAL_TYPES:
            if state.terminal:
                return False  # the same terminal entry, from another tag stream
            state.terminal = True
            if state.copies:  # no copy is written after the terminal entry: see _is_copy
                state.copies, state.forgotten = None, seq
        elif self._several and len(entry.tags) > 1 and self._is_copy(state, entry.tags, stream, seq):
            return False
        return restart or gap or True

    def _is_copy(self, state: _JobState, tags: tuple[str, ...], stream: str, seq: int) -> bool:
        """Whether this chunk (new in ``stream``) was passed on from another followed stream."""
        copies = state.copies
        if copies is not None and (waiting := copies.get(seq)) is not None:
            rest = tuple(s for s in waiting if s != stream)
            if rest:
                copies[seq] = rest
            else:
                del copies[seq]
            return True
        others = self._followed.get(tags)
        if others is None:
            if len(self._followed) >= 4096:
                self._followed.clear()
            others = self._followed[tags] = tuple(self._followed_streams(tags))
        if len(others) < 2:
            return False  # one followed stream holds it: no copies to expect
        last_seq = state.last_seq
        # Forgotten (bound, or the attempt ended)? Each stream holds the attempt's chunks of its tag
        # in order, and loses them from its head only, so one that has gone past this seq since the
        # first remembered held this chunk too.
        if state.first_copy <= seq <= state.forgotten and any(
            last_seq.get(s, -1) >= seq for s in others if s != stream
        ):
            return True
        # Passed on now; a copy may still come from each other stream not yet past this seq.
        waiting = tuple(s for s in others if s != stream and last_seq.get(s, -1) < seq)
        if waiting:
            if copies is None:
                copies = state.copies = {}
                if state.first_copy < 0:
                    state.first_copy = seq
            copies[seq] = waiting
            if len(copies) > self._max_copies:
                oldest = next(iter(copies))
                del copies[oldest]
                state.forgotten = max(state.forgotten, oldest)
        return False

    def _followed_streams(self, tags: Iterable[str]) -> Iterable[str]:
        for tag in dict.fromkeys(tags):
            stream = self._stream_of_tag.get(tag)
            if stream is not None:
                yield stream
