"""The dead letters of consumer groups (``<prefix>:dead``): list them, read one, hand them back.

A group moves an entry there when its handler failed on it ``max_deliveries`` times, or when it
is no tokenbus entry (:mod:`tokenbus.consumer.groups`). Once the cause is mended (the service the
handler calls is back, say), :func:`redrive` hands entries back to their group: each is appended
to its stream again, with ``redrive_group`` naming the group, and removed from the dead letters.
That group handles it like any new entry; other groups ack it unhandled, and plain readers
(``subscribe``, ``tail``, the gateway) skip it. An entry that is no tokenbus entry is not handed
back: its group would dead-letter it again at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis import exceptions as redis_errors

from tokenbus.consumer._redis_cluster import AnyRedis, is_cluster
from tokenbus.consumer.reader import as_text
from tokenbus.schemas.entries import REDRIVE_GROUP, Entry
from tokenbus.schemas.errors import MalformedEntry, TokenbusError
from tokenbus.schemas.keys import StreamKeys

DEAD_FIELDS = ("dead_stream", "dead_id", "dead_group", "dead_reason")
"""What a group adds to an entry it dead-letters: where it was, which group gave up, and why."""
PAGE = 500


class NotRedriven(TokenbusError):
    """A dead letter that cannot be handed back (gone, or no tokenbus entry); the message says which."""


@dataclass(frozen=True)
class DeadLetter:
    """One entry of ``<prefix>:dead``."""

    id: str
    stream: str
    """The stream the entry was read from."""
    entry_id: str
    """Its id there."""
    group: str
    reason: str
    fields: dict[str, str]
    """The entry's own fields."""

    @classmethod
    def from_record(cls, dead_id: str, record: dict[Any, Any]) -> DeadLetter:
        values = {as_text(k): as_text(v) for k, v in record.items()}
        return cls(
            id=dead_id, stream=values.pop("dead_stream", ""), entry_id=values.pop("dead_id", ""),
            group=values.pop("dead_group", ""), reason=values.pop("dead_reason", ""), fields=values,
        )  # fmt: skip

    @property
    def job(self) -> str:
        return self.fields.get("job", "")

    @property
    def type(self) -> str:
        return self.fields.get("type", "")

    def entry(self) -> Entry | None:
        """The entry, or None if it is no tokenbus entry (with its fields unparsed)."""
        try:
            return Entry.decode(self.fields, id=self.entry_id, stream=self.stream)
        except MalformedEntry:
            return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "stream": self.stream, "entry_id": self.entry_id, "group": self.group,
            "reason": self.reason, "fields": self.fields,
        }  # fmt: skip


async def dead_letters(
    redis: AnyRedis, keys: StreamKeys, *, group: str | None = None, count: int = 100
) -> list[DeadLetter]:
    """The newest ``count`` dead letters (of ``group``, if given), newest first."""
    found: list[DeadLetter] = []
    end = "+"
    while len(found) < count:
        page = await redis.xrevrange(keys.dead_letter, max=end, count=PAGE if group else count)
        for dead_id, record in page:
            letter = DeadLetter.from_record(as_text(dead_id), record)
            if group is None or letter.group == group:
                found.append(letter)
        if len(page) < (PAGE if group else count):
            break
        end = "(" + as_text(page[-1][0])
    return found[:count]


async def dead_letter(redis: AnyRedis, keys: StreamKeys, dead_id: str) -> DeadLetter | None:
    """One dead letter by its id in ``<prefix>:dead``; None if there is none."""
    try:
        reply = await redis.xrange(keys.dead_letter, dead_id, dead_id)
    except redis_errors.ResponseError as e:  # an id that is no stream id: Redis refuses it
        if "Invalid stream ID" in str(e):
            return None
        raise
    return DeadLetter.from_record(as_text(reply[0][0]), reply[0][1]) if reply else None


async def redrive(redis: AnyRedis, keys: StreamKeys, dead_ids: list[str]) -> dict[str, str]:
    """Hand the dead letters ``dead_ids`` back to their groups; return each one's new id in its
    stream. Raises :class:`NotRedriven` (before handing any back) for one that is gone or is no
    tokenbus entry."""
    letters = []
    for dead_id in dict.fromkeys(dead_ids):
        letter = await dead_letter(redis, keys, dead_id)
        if letter is None:
            raise NotRedriven(f"no dead letter {dead_id} in {keys.dead_letter} (tokenbus dead lists them)")
        if letter.entry() is None or not letter.stream or not letter.group:
            raise NotRedriven(
                f"dead letter {dead_id} is no tokenbus entry ({letter.reason}): its group would dead-letter it again"
            )
        letters.append(letter)
    new_ids = {}
    for letter in letters:
        record: dict[Any, Any] = {**letter.fields, REDRIVE_GROUP: letter.group}
        if is_cluster(redis):  # the two keys' slots differ: no transaction; the entry first, so a
            # failure between the two leaves the dead letter to be handed back again
            new_id = await redis.xadd(letter.stream, record)
            await redis.xdel(keys.dead_letter, letter.id)
        else:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.xadd(letter.stream, record)
                pipe.xdel(keys.dead_letter, letter.id)
                new_id, _ = await pipe.execute()
        new_ids[letter.id] = as_text(new_id)
    return new_ids
