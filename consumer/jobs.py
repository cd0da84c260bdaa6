"""A job's output as a whole: rebuild the final text of its newest attempt from the job stream.

For consumers that join late or only want results: :func:`job_result` reads the job stream from
its start and folds it into a :class:`JobView` (text, status, the graph's final state, and what
the ``updates`` and ``values`` modes published); ``wait=True`` follows the job until it ends.
A job stream capped by ``TOKENBUS_JOB_MAXLEN`` may have lost an attempt's first entries: the view
then says so (``complete`` is false, ``missing`` counts them) rather than pass a part for the whole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from tokenbus.consumer._redis_cluster import AnyRedis
from tokenbus.consumer.attempts import AttemptFilter
from tokenbus.consumer.reader import BEGINNING, as_text
from tokenbus.consumer.subscribe import subscribe
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.schemas.errors import MalformedEntry
from tokenbus.schemas.keys import DEFAULT_PREFIX, StreamKeys

logger = logging.getLogger(__name__)


@dataclass
class JobView:
    """What one job produced, for the newest attempt only: text per tag and overall, its final
    state, and its state entries (``updates`` and ``values`` modes)."""

    job: str
    attempt: int = 0
    status: EntryType | None = None
    """The final terminal entry's type, None while the job runs."""
    error: str = ""
    text: str = ""
    texts: dict[str, str] = field(default_factory=dict)
    """Text per tag."""
    node_texts: dict[str, str] = field(default_factory=dict)
    """Text per node."""
    chunks: int = 0
    missing: int = 0
    """Entries of the attempt that were not seen (trimmed from the job stream, or never written):
    its ``seq``s are contiguous from 0, so each one skipped counts."""
    next_seq: int = 0
    """The ``seq`` the attempt's next entry has."""
    started_ts: int | None = None
    first_chunk_ts: int | None = None
    ended_ts: int | None = None
    """When the attempt started, streamed its first chunk and ended (the entries' ``ts``, ms)."""
    result: Any = None
    """The graph's final state, JSON by the contract's State rules (``data["result"]`` of the job
    stream's ``end``); None until the job ends well."""
    updates: list[str] = field(default_factory=list)
    """The node of each ``update`` entry, in order, subgraphs' nodes included (``updates`` mode)."""
    state: Any = None
    """The top graph's state after its latest step (its newest ``values`` entry; ``values`` mode)."""

    def apply(self, entry: Entry) -> None:
        """Fold in the next entry of the job (in stream order, newest attempt only, each once)."""
        if entry.attempt > self.attempt:  # a new attempt starts over
            self.attempt, self.status, self.error, self.text, self.texts = entry.attempt, None, "", "", {}
            self.node_texts = {}
            self.chunks = self.missing = self.next_seq = 0
            self.started_ts = self.first_chunk_ts = self.ended_ts = None
            self.result, self.updates, self.state = None, [], None
        if entry.seq > self.next_seq:
            self.missing += entry.seq - self.next_seq
        self.next_seq = max(self.next_seq, entry.seq + entry.n)
        if entry.is_chunk:
            self.chunks += entry.n  # a merged entry holds n chunks
            if self.first_chunk_ts is None:
                self.first_chunk_ts = entry.ts
            self.text += entry.content
            for tag in entry.tags:
                self.texts[tag] = self.texts.get(tag, "") + entry.content
            if entry.content:
                self.node_texts[entry.node] = self.node_texts.get(entry.node, "") + entry.content
        elif entry.type is EntryType.START:
            self.started_ts = entry.ts
        elif entry.type is EntryType.UPDATE:
            self.updates.append(entry.node)
        elif entry.type is EntryType.VALUES:
            try:
                if not entry.meta.get("langgraph_checkpoint_ns"):  # the top graph's, not a subgraph's
                    self.state = entry.data
            except MalformedEntry as e:
                logger.warning("job %s: skipping the state of entry %s: %s", self.job, entry.id, e)
        elif entry.is_final:
            self.status, self.error, self.ended_ts = entry.type, entry.error, entry.ts
            if entry.type is EntryType.END:
                self.result = _result(entry)

    @property
    def done(self) -> bool:
        return self.status is not None

    @property
    def complete(self) -> bool:
        """Every entry of the attempt so far was seen, from its ``start`` on: the text is whole."""
        return self.next_seq > 0 and self.missing == 0


def _result(end: Entry) -> Any:
    try:
        data = end.data
    except MalformedEntry as e:
        logger.warning("job %s: no result: entry %s: %s", end.job, end.id, e)
        return None
    return data.get("result") if isinstance(data, dict) else None


async def job_result(redis: AnyRedis, job_id: str, *, prefix: str = DEFAULT_PREFIX, wait: bool = False) -> JobView:
    """The job's output so far (``wait=False``), or once it has ended (``wait=True``)."""
    view = JobView(job_id)
    if wait:
        async for item in subscribe(redis, jobs=[job_id], prefix=prefix, start=BEGINNING, until_final=True):
            if isinstance(item, Entry):
                view.apply(item)
        return view
    key = StreamKeys(prefix).job(job_id)
    entries = []
    for entry_id, fields in await redis.xrange(key):
        try:
            entries.append(Entry.decode(fields, id=as_text(entry_id), stream=key))
        except MalformedEntry as e:
            logger.warning("skipping entry %s of %s: %s", as_text(entry_id), key, e)
    attempts = AttemptFilter()
    if entries:
        attempts.expect(job_id, max(e.attempt for e in entries))  # the superseded attempts are skipped
    for entry in entries:
        if attempts.accept(entry):
            view.apply(entry)
    return view
