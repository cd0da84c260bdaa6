"""Adaptive coalescing (``TOKENBUS_COALESCE=adaptive``): more tokens per Redis core under load.

While the publisher is congested (:attr:`Publisher.coalescing`), a chunk of a model call joins
the entry of the call's previous chunk if that entry still waits in the publisher's buffer and
nothing of the job was queued after it: one entry then holds ``n`` chunks, ``content``
concatenated, ``seq`` and ``ts`` of the first (contract: ``seq + n`` is the next entry's ``seq``).
Nothing waits to be merged, so no chunk is written later than it would have been; when the
publisher keeps up, every chunk is an entry of its own, as without coalescing.

Merging is lossless, or it does not happen. Chunks join only when they share everything but their
text: the same template (job, attempt, type, node, tags, metadata: one model call, or one writer's
payloads with the same tags), and

- ``token``: the same ``data`` (message id and response metadata), and neither chunk carries
  tool-call chunks or usage (those differ per chunk; a finish reason makes ``data`` differ too);
- ``custom``: payloads that are JSON objects whose ``content`` is a string and whose other keys
  and values are equal; the merged entry's ``data`` is that object with ``content`` concatenated.

Where each chunk's text began is lost: that is what merging saves.
"""

from __future__ import annotations

from typing import Any

import orjson

from tokenbus.worker.wire import ChunkTemplate

MERGE_MAX_CONTENT = 4096
"""Bytes of text past which a merged entry takes no more chunks: each merge packs the entry
again, so this bounds the work a merge costs (a few KB copied) and the size of an entry."""


class Merge:
    """A chunk entry waiting in the publisher's buffer (queued as ``index``), which later chunks of
    its model call may join (:meth:`joins`, :meth:`add`)."""

    __slots__ = ("_payload", "content", "data", "index", "n", "seq", "template", "ts")

    def __init__(
        self, template: ChunkTemplate, index: int, seq: int, content: str, data: bytes, ts: int, payload: bool
    ) -> None:
        self.template, self.index, self.seq, self.ts = template, index, seq, ts
        self.content, self.data, self.n = content, data, 1
        self._payload: dict[str, Any] | None = orjson.loads(data) if payload else None
        """A custom chunk's payload as written (a copy: a writer may reuse and change its dict)."""

    def joins(self, template: ChunkTemplate, seq: int, data: bytes, payload: Any) -> bool:
        """Whether the chunk ``seq`` (of ``template``, with ``data``; ``payload``: a custom chunk's,
        None for a token) can join this entry without loss."""
        if template is not self.template or seq != self.seq + self.n or len(self.content) >= MERGE_MAX_CONTENT:
            return False
        first = self._payload
        if first is None:
            return payload is None and (data is self.data or data == self.data)
        return (
            payload is not None
            and payload.__class__ is dict
            and len(payload) == len(first)
            and all(key == "content" or first.get(key, _ABSENT) == value for key, value in payload.items())
        )

    def add(self, content: str) -> bytes:
        """Join the next chunk's text; returns the entry's commands, packed again."""
        self.content += content
        self.n += 1
        payload = self._payload
        if payload is not None:
            payload["content"] = self.content
            self.data = orjson.dumps(payload)
        return self.template.pack_merged(self.seq, self.content, self.data, self.ts, self.n)


_ABSENT = object()
