"""How ``tokenbus tail`` shows entries: text like the LangGraph how-to, or JSON lines."""

from __future__ import annotations

from typing import Any, Literal, TextIO

import orjson

from consumer.reader import Gap
from schemas.entries import Entry, EntryType

Format = Literal["text", "jsonl"]


def entry_json(entry: Entry) -> dict[str, Any]:
    """An entry as one JSON object: every contract field plus ``id`` and ``stream``."""
    return entry.to_dict()


class Printer:
    """Writes entries to ``out`` (tokens) and notices to ``err`` (lifecycle), flushing per token."""

    def __init__(self, out: TextIO, err: TextIO, *, format: Format = "text", sep: str = "") -> None:
        self._out = out
        self._err = err
        self._format = format
        self._sep = sep
        self._attempts: dict[str, int] = {}

    def show(self, item: Entry | Gap) -> None:
        if isinstance(item, Gap):
            self.notice(str(item))
            return
        if self._format == "jsonl":
            self._out.write(orjson.dumps(entry_json(item)).decode() + "\n")
            self._out.flush()
            return
        previous = self._attempts.get(item.job)
        if previous is not None and item.attempt > previous:
            self.notice(f"job {item.job}: attempt {previous} was interrupted; attempt {item.attempt} follows")
        self._attempts[item.job] = item.attempt
        if item.is_chunk:
            if item.content:
                self._out.write(item.content + self._sep)
                self._out.flush()
        elif item.type is EntryType.START:
            self.notice(f"job {item.job}: attempt {item.attempt} started")
        elif item.is_terminal:
            self._out.write("\n")
            self._out.flush()
            detail = f": {item.error}" if item.error else ""
            self.notice(f"job {item.job}: attempt {item.attempt} {item.type.value}{detail}")

    def notice(self, text: str) -> None:
        self._err.write(f"[tokenbus] {text}\n")
        self._err.flush()
