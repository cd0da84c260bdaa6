"""Exactly-once in effect: per job, keep only the highest attempt and drop repeated entries.

arq runs a job at least once; each run is an attempt and starts its ``seq`` at 0. A publisher
that retried a batch may also have written some entries twice. :class:`AttemptFilter` sees
every entry once, in stream order, and accepts an entry only if it belongs to the newest
attempt of its job and has not been accepted before.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field

from schemas.entries import TERMINAL_TYPES, Entry


@dataclass(slots=True)
class _JobState:
    attempt: int
    last_seq: dict[str, int] = field(default_factory=dict)  # per stream
    terminal: bool = False


class AttemptFilter:
    """Decides which entries a reader passes on. ``tag_streams`` maps stream key to tag when the
    reader follows several tag streams, so a chunk copied to two of them is passed on once.
    ``ordered=False`` (consumer groups, where claimed entries arrive late) only drops superseded
    attempts: repeated entries are then the at-least-once of groups."""

    def __init__(
        self, tag_streams: dict[str, str] | None = None, *, ordered: bool = True, max_jobs: int = 100_000
    ) -> None:
        self._tag_streams = tag_streams or {}
        self._ordered = ordered
        self._jobs: OrderedDict[str, _JobState] = OrderedDict()  # least recently seen first
        self._newest: _JobState | None = None  # the last one seen (no need to move it to the end)
        self._max_jobs = max_jobs

    def accept(self, entry: Entry) -> bool:
        job = entry.job
        state = self._jobs.get(job)
        if state is None or entry.attempt > state.attempt:
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
            return True
        stream = entry.stream or ""
        seq = entry.seq
        if seq <= state.last_seq.get(stream, -1):
            return False  # written twice by a retried batch
        state.last_seq[stream] = seq
        if entry.type in TERMINAL_TYPES:
            if state.terminal:
                return False  # the same terminal entry, from another tag stream
            state.terminal = True
            return True
        if len(self._tag_streams) > 1 and entry.tags:
            return self._home_stream(entry.tags) == stream
        return True

    def _home_stream(self, tags: Collection[str]) -> str | None:
        """The first followed stream among the entry's tags: the one copy to keep."""
        for stream, tag in self._tag_streams.items():
            if tag in tags:
                return stream
        return None
