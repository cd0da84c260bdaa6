"""How ``tokenbus tail`` shows entries: text like the LangGraph how-to, or JSON lines.

Gaps go to stderr in both formats. A restarted job is a notice on stderr in text, and a
``{"type": "restart", ...}`` line among the entries in JSONL, so that a program reading them
knows to drop what it kept of the job's older attempt. State entries (``updates`` and ``values``
modes) are JSON lines like any entry; in text, an ``update`` is a one-line notice naming its node
and a ``values`` entry is not shown (a whole state is no text to read along).

Text that may come from several jobs at once (a tag stream, several ``--job``) is labelled, so
that concurrent jobs do not interleave into one unreadable line: each run of tokens of one job
(and, following several tags, one tag) starts a line with a short label, ``[…9f3a21bc] `` or
``[…9f3a21bc poem] ``, the job id's last 8 characters (notices name it in full); every line of
it carries the label, so ``grep`` keeps one job's lines. Text of one job is written as it comes.
"""

from __future__ import annotations

from collections.abc import Collection
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

    def __init__(
        self,
        out: TextIO,
        err: TextIO,
        *,
        format: Format = "text",
        sep: str = "",
        label: bool = False,
        tags: Collection[str] = (),
    ) -> None:
        """``label``: text from several jobs, labelled per job (and per tag of ``tags``, when
        there are several)."""
        self._out = out
        self._err = err
        self._format = format
        self._sep = sep
        self._label = label
        self._tags = tuple(tags) if len(tags) > 1 else ()
        self._line: tuple[str, str] | None = None  # the (job, tag) whose text the last line holds
        self._at_line_start = True

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
                if self._label:
                    self._write_labelled(item)
                else:
                    self._out.write(item.content + self._sep)
                self._out.flush()
        elif item.type is EntryType.START:
            self.notice(f"job {item.job}: attempt {item.attempt} started")
        elif item.type is EntryType.UPDATE:
            self.notice(f"job {item.job}: update from node {item.node}")
        elif item.is_terminal:
            if not self._label:
                self._out.write("\n")
            elif self._line is not None and self._line[0] == item.job:
                self._end_line()
            self._out.flush()
            detail = f": {item.error}" if item.error else ""
            self.notice(f"job {item.job}: attempt {item.attempt} {item.type.value}{detail}")

    def _write_labelled(self, entry: Entry) -> None:
        tag = next((t for t in self._tags if t in entry.tags), "")
        segment = (entry.job, tag)
        if segment != self._line:
            self._end_line()
            self._line = segment
        label = f"[{short_job(entry.job)}{' ' if tag else ''}{tag}] "
        for i, part in enumerate((entry.content + self._sep).split("\n")):
            if i:
                self._out.write("\n")
                self._at_line_start = True
            if part:
                if self._at_line_start:
                    self._out.write(label)
                    self._at_line_start = False
                self._out.write(part)

    def _end_line(self) -> None:
        if not self._at_line_start:
            self._out.write("\n")
            self._at_line_start = True
        self._line = None

    def notice(self, text: str) -> None:
        self._err.write(f"[tokenbus] {text}\n")
        self._err.flush()


def short_job(job: str) -> str:
    """A job id short enough to label lines: the last 8 characters (random in a generated id, and
    what tells ``report-2024-a`` from ``report-2024-b``)."""
    return job if len(job) <= 9 else "…" + job[-8:]
