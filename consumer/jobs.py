"""A job's output as a whole: rebuild the final text of its newest attempt from the job stream.

For consumers that join late or only want results: :func:`job_result` reads the job stream from
its start and folds it into a :class:`JobView`; ``wait=True`` follows the job until it ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from redis.asyncio import Redis

from consumer.attempts import AttemptFilter
from consumer.reader import BEGINNING
from consumer.subscribe import subscribe
from schemas.entries import Entry, EntryType
from schemas.keys import DEFAULT_PREFIX, StreamKeys


@dataclass
class JobView:
    """What one job produced: text per tag and overall, for the newest attempt only."""

    job: str
    attempt: int = 0
    status: EntryType | None = None
    """The final terminal entry's type, None while the job runs."""
    error: str = ""
    text: str = ""
    texts: dict[str, str] = field(default_factory=dict)
    chunks: int = 0

    def apply(self, entry: Entry) -> None:
        """Fold in the next entry of the job (in stream order, newest attempt only)."""
        if entry.attempt > self.attempt:  # a new attempt starts over
            self.attempt, self.status, self.error, self.text, self.texts, self.chunks = (
                entry.attempt,
                None,
                "",
                "",
                {},
                0,
            )
        if entry.is_chunk:
            self.chunks += 1
            self.text += entry.content
            for tag in entry.tags:
                self.texts[tag] = self.texts.get(tag, "") + entry.content
        elif entry.is_final:
            self.status, self.error = entry.type, entry.error

    @property
    def done(self) -> bool:
        return self.status is not None


async def job_result(redis: Redis, job_id: str, *, prefix: str = DEFAULT_PREFIX, wait: bool = False) -> JobView:
    """The job's output so far (``wait=False``), or once it has ended (``wait=True``)."""
    view = JobView(job_id)
    if wait:
        async for item in subscribe(redis, jobs=[job_id], prefix=prefix, start=BEGINNING, until_final=True):
            if isinstance(item, Entry):
                view.apply(item)
        return view
    key = StreamKeys(prefix).job(job_id)
    attempts = AttemptFilter()
    for entry_id, fields in await redis.xrange(key):
        entry = Entry.decode(fields, id=entry_id.decode(), stream=key)
        if attempts.accept(entry):
            view.apply(entry)
    return view
