"""How ``tokenbus tail`` shows entries: text like the LangGraph how-to, or JSON lines.

Gaps go to stderr in both formats. A restarted job is a notice on stderr in text, and a
``{"type": "restart", ...}`` line among the entries in JSONL, so that a program reading them
knows to drop what it kept of the job's older attempt. State entries (``updates`` and ``values``
modes) are JSON lines like any entry; in text, an ``update`` is a one-line notice naming its node
and a ``values`` entry is not shown (a whole state is no text to read along).
"""

from __future__ import annotations

from typing import Any, Literal, TextIO

import orjson

from tokenbus.consumer.attempts import Restart
from tokenbus.consumer.reader import Gap
from tokenbus.schemas.entries import Entry, EntryType

Format = Literal["text", "jsonl"]


def restart_json(restart: Restart) -> dict[str, Any]:
    """A restart as one JSON object among the entries: ``type`` ``"restart"``, ``job``, ``attempt``,
    ``previous_attempt``."""
    return {
        "type": restart.type, "job": restart.job, "attempt": restart.attempt,
        "previous_attempt": restart.previous_attempt,
    }  # fmt: skip


class Printer:
    """Writes entries to ``out`` (tokens) and notices to ``err`` (lifecycle), flushing per token."""

    def __init__(self, out: TextIO, err: TextIO, *, format: Format = "text", sep: str = "") -> None:
        self._out = out
        self._err = err
        self._format = format
        self._sep = sep

    def show(self, item: Entry | Gap | Restart) -> None:
        """Print one item; an entry whose ``data`` or ``meta`` is broken JSON raises
        :class:`MalformedEntry` before anything of it is written."""
        if isinstance(item, Gap):
            self.notice(str(item))
            return
        if self._format == "jsonl":
            line = orjson.dumps(restart_json(item) if isinstance(item, Restart) else item.to_dict())
            self._out.write(line.decode() + "\n")
            self._out.flush()
            return
        if isinstance(item, Restart):
            self.notice(str(item))
        elif item.is_chunk:
            if item.content:
                self._out.write(item.content + self._sep)
                self._out.flush()
        elif item.type is EntryType.START:
            self.notice(f"job {item.job}: attempt {item.attempt} started")
        elif item.type is EntryType.UPDATE:
            self.notice(f"job {item.job}: update from node {item.node}")
        elif item.is_terminal:
            self._out.write("\n")
            self._out.flush()
            detail = f": {item.error}" if item.error else ""
            self.notice(f"job {item.job}: attempt {item.attempt} {item.type.value}{detail}")

    def notice(self, text: str) -> None:
        self._err.write(f"[tokenbus] {text}\n")
        self._err.flush()
