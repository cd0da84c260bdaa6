"""The consumer API: ``async for entry in subscribe(redis, tags=["poem"]): ...``.

Yields typed :class:`tokenbus.schemas.Entry` objects, newest attempt of each job only, each entry once
(however many followed streams hold a copy), filtered by job, node and type; and notices:
:class:`Gap` (entries were trimmed before they were read, or, following job streams, a job's
``seq`` jumped: entries are missing) and :class:`Restart` (a newer attempt of a job begins: what
came of the older one is superseded). Entries that are not tokenbus v1
entries are logged and skipped (``on_malformed="raise"`` raises instead); nothing else is lost.

A replay of a job stream from its start passes on only the attempt that was newest when it began
(later ones follow as restarts), and reports a gap if that attempt's ``start`` entry is no
longer held (the stream was trimmed: the output is incomplete).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Collection, Iterable, Mapping
from contextlib import aclosing
from typing import Literal

from tokenbus.consumer._redis_cluster import AnyRedis
from tokenbus.consumer.attempts import MAX_COPIES_PER_JOB, AttemptFilter, Restart
from tokenbus.consumer.reader import BEGINNING, LATEST, Gap, StreamReader, as_text, latest_positions, parse_id
from tokenbus.schemas.entries import TERMINAL_TYPES, Entry, EntryType, redrive_group
from tokenbus.schemas.errors import MalformedEntry
from tokenbus.schemas.keys import DEFAULT_PREFIX, StreamKeys

logger = logging.getLogger(__name__)


async def subscribe(
    redis: AnyRedis,
    *,
    tags: Iterable[str] = (),
    jobs: Iterable[str] = (),
    nodes: Collection[str] = (),
    types: Collection[EntryType | str] = (),
    prefix: str = DEFAULT_PREFIX,
    start: str = LATEST,
    resume: dict[str, str] | None = None,
    until_final: bool | None = None,
    block_ms: int = 5000,
    on_malformed: Literal["skip", "raise"] = "skip",
    parse_json: bool = False,
) -> AsyncIterator[Entry | Gap | Restart]:
    """Follow tag streams (``tags``) or job streams (``jobs``).

    With both, the tag streams are read and only the given jobs' entries are passed on.
    ``start`` is ``"$"`` (new entries only), ``"0"`` (everything the streams hold) or an entry
    id; ``resume`` maps stream keys to the last id processed and wins over ``start``.
    ``until_final`` (default: on when following jobs) stops once every followed job has written
    its final terminal entry. The reader blocks on a connection of its own (made with the client's
    settings), whatever the client's ``socket_timeout``.

    The JSON of ``data`` and ``meta`` is parsed when first accessed, and a broken one raises
    :class:`MalformedEntry` then; ``parse_json=True`` parses it before an entry is passed on, so
    that such an entry is skipped (or raised) like any other malformed entry.
    """
    keys = StreamKeys(prefix)
    tag_list, job_list = list(dict.fromkeys(tags)), list(dict.fromkeys(jobs))
    streams = streams_for(keys, tag_list, job_list)
    tag_streams = {keys.tag(t): t for t in tag_list}
    initial = BEGINNING if start in ("0", "0-0") else start
    positions = {s: (resume or {}).get(s, initial) for s in streams}
    reader = StreamReader(redis, positions, block_ms=block_ms)
    attempts = AttemptFilter(tag_streams, job_streams=() if tag_list else streams)
    # job streams replayed from their start: the first entry passed on of each must be its start
    replayed = {job: keys.job(job) for job in job_list if not tag_list and positions[keys.job(job)] == BEGINNING}
    for job, attempt in (await newest_attempts(redis, replayed)).items():
        attempts.expect(job, attempt)
    unstarted = set(replayed)
    wanted_jobs = set(job_list)
    wanted_types = {EntryType(t) for t in types}
    wanted_nodes = set(nodes)
    if until_final and not job_list:
        raise ValueError("until_final needs jobs to follow; tag streams never end")
    # a resumed reader passes on nothing it passed on before it stopped
    ended = await prime(redis, attempts, {s: p for s, p in positions.items() if s in resume}) if resume else set()
    open_jobs = set(job_list) - ended if job_list and until_final is not False else None
    if open_jobs is not None and not open_jobs:
        return
    ends = _Ends(open_jobs, streams, several=len(tag_streams) > 1) if open_jobs is not None else None

    decode, accept = Entry.decode, attempts.accept
    async with aclosing(reader.batches()) as batches:  # closed at once: frees the reader's connection
        async for batch in batches:
            if isinstance(batch, Gap):
                yield batch
                continue
            for stream, entry_id, fields in batch:
                try:
                    entry = decode(fields, id=entry_id, stream=stream)
                except MalformedEntry as e:
                    if on_malformed == "raise":
                        raise
                    logger.warning("skipping entry %s of %s: %s", entry_id, stream, e)
                    continue
                if (wanted_jobs and entry.job not in wanted_jobs) or redrive_group(fields) is not None:
                    continue  # (a dead letter handed back to a consumer group is not new)
                if ends is not None:
                    ends.saw(entry, stream)
                verdict = accept(entry)
                if not verdict:
                    continue
                if verdict is not True:
                    yield verdict  # a Restart, or a Gap before this entry
                if unstarted and entry.job in unstarted:
                    unstarted.discard(entry.job)
                    if entry.seq != 0:  # the attempt's first entries were trimmed
                        yield Gap(stream, BEGINNING, entry_id)
                terminal = entry.type in TERMINAL_TYPES
                if (
                    (not wanted_types or entry.type in wanted_types)
                    and (not wanted_nodes or entry.node in wanted_nodes or terminal)
                    and (not parse_json or _json_parses(entry, on_malformed))
                ):
                    yield entry
            if ends is not None and await ends.over(redis, reader.positions):
                return


class _Ends:
    """Which followed jobs are over: from one stream (or several job streams), at their final
    entry. When jobs are followed through several tag streams, a job's final entry in one of them
    does not end the follow: the streams are read in their own order each (on a Redis Cluster, each on
    its own connection), and another may still hold chunks of the job. A job is over once every
    followed stream that carried its newest attempt has shown its final entry (each stream holds
    a job's entries in order, its terminal entry last), and every followed stream was read up to
    where it ended when the job's first final entry was seen (a stream whose copies of the job's
    last chunks were still on their way then: they were written before that final entry)."""

    def __init__(self, open_jobs: set[str], streams: list[str], *, several: bool) -> None:
        self.open_jobs = open_jobs
        self._streams = streams
        self._several = several
        self._attempt: dict[str, int] = {}
        self._carried: dict[str, set[str]] = {}  # job → followed streams that carried its newest attempt
        self._ended: dict[str, set[str]] = {}  # job → those that showed its final entry
        self._closing: set[str] = set()  # jobs whose first final entry was just seen
        self._targets: dict[str, dict[str, str]] = {}  # job → where each stream ended then

    def saw(self, entry: Entry, stream: str) -> None:
        """An entry of a followed job (passed on or not: a copy counts) read from ``stream``."""
        if not self._several:
            if entry.is_final:
                self.open_jobs.discard(entry.job)
            return
        job, attempt = entry.job, self._attempt.get(entry.job, 0)
        if entry.attempt < attempt:
            return
        if entry.attempt > attempt:
            self._attempt[job], self._carried[job], self._ended[job] = entry.attempt, set(), set()
            self._closing.discard(job)
            self._targets.pop(job, None)
        self._carried[job].add(stream)
        if entry.is_final:
            self._ended[job].add(stream)
            if job not in self._targets:
                self._closing.add(job)

    async def over(self, redis: AnyRedis, positions: Mapping[str, str]) -> bool:
        """Whether every followed job is over (``positions``: each stream's last id read)."""
        open_jobs = self.open_jobs
        if self._closing:
            latest = await latest_positions(redis, self._streams)
            for job in self._closing:
                self._targets[job] = latest
            self._closing.clear()
        for job, targets in self._targets.items():
            if (
                job in open_jobs
                and self._carried[job] <= self._ended[job]
                and all(parse_id(positions[s]) >= parse_id(last) for s, last in targets.items())
            ):
                open_jobs.discard(job)
        return not open_jobs


def _json_parses(entry: Entry, on_malformed: Literal["skip", "raise"]) -> bool:
    """Parse ``data`` and ``meta`` now (kept for later); False (logged) or raised if either is broken."""
    try:
        entry.data, entry.meta  # noqa: B018
    except MalformedEntry as e:
        if on_malformed == "raise":
            raise
        logger.warning("skipping entry %s of %s: %s", entry.id, entry.stream, e)
        return False
    return True


async def newest_attempts(redis: AnyRedis, streams: dict[str, str], *, look_back: int = 16) -> dict[str, int]:
    """The newest attempt of each job (job → job stream) among the last entries of its stream
    (a few, not one: the killed attempt's last entries can land after the next attempt's first)."""
    if not streams:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams.values():
            pipe.xrevrange(stream, count=look_back)
        replies = await pipe.execute()
    newest = {}
    for (job, stream), reply in zip(streams.items(), replies, strict=True):
        attempts = []
        for entry_id, fields in reply:
            try:
                attempts.append(Entry.decode(fields, id=as_text(entry_id), stream=stream).attempt)
            except MalformedEntry:
                continue
        if attempts:
            newest[job] = max(attempts)
    return newest


async def prime(
    redis: AnyRedis, attempts: AttemptFilter, positions: Mapping[str, str], *, look_back: int = MAX_COPIES_PER_JOB
) -> set[str]:
    """Tell ``attempts`` what a reader that stopped at ``positions`` (stream → last id processed)
    had read: the last ``look_back`` entries of each stream up to its position. A resumed reader
    then passes on no copy of a chunk it passed on from another stream, and nothing of an attempt
    it saw superseded. Returns the jobs whose final terminal entry was among them."""
    streams = [(s, p) for s, p in positions.items() if p not in (BEGINNING, LATEST)]
    if not streams:
        return set()
    async with redis.pipeline(transaction=False) as pipe:
        for stream, position in streams:
            pipe.xrevrange(stream, max=position, count=look_back)
        replies = await pipe.execute()
    ended = set()
    for (stream, _), reply in zip(streams, replies, strict=True):
        for entry_id, fields in reversed(reply):
            try:
                entry = Entry.decode(fields, id=as_text(entry_id), stream=stream)
            except MalformedEntry:
                continue
            if attempts.accept(entry) and entry.is_final:
                ended.add(entry.job)
    return ended


def streams_for(keys: StreamKeys, tags: Iterable[str], jobs: Iterable[str]) -> list[str]:
    """The stream keys :func:`subscribe` reads: the tags' streams if any, else the jobs' streams."""
    tag_list, job_list = list(dict.fromkeys(tags)), list(dict.fromkeys(jobs))
    if not tag_list and not job_list:
        raise ValueError("subscribe to at least one tag or job")
    return [keys.tag(t) for t in tag_list] if tag_list else [keys.job(j) for j in job_list]
