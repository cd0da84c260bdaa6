"""``tokenbus top``: a live terminal view of one queue and prefix, redrawn every ``--interval``.

Running jobs with their tokens/s, tag streams with theirs, consumer groups' lag and the newest
errors, gathered by :class:`tokenbus.top_data.TopSampler` and drawn with ``rich`` (extra ``top``)
on the terminal's alternate screen, as ``top`` does. ``q`` or Ctrl-C quits, leaving the terminal
as it was. On a stdout that is not a terminal (or with ``--once``), one view is printed, its
rates measured over one interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Iterator
from typing import TypeVar

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tokenbus.exits import EXIT_OK
from tokenbus.operate import ago
from tokenbus.schemas.keys import validate_tag
from tokenbus.top_data import Snapshot, TopSampler
from tokenbus.worker.redis_client import redis_from_settings, streams_from_settings
from tokenbus.worker.settings import Settings

T = TypeVar("T")

QUIT_KEYS = frozenset(b"qQ")


async def run_top(
    settings: Settings,
    *,
    interval: float,
    tags: list[str],
    limit: int,
    once: bool = False,
    console: Console | None = None,
) -> int:
    """Sample and draw until ``q``, Ctrl-C or SIGTERM. A Redis error ends it (the CLI says it in one line)."""
    for tag in tags:
        validate_tag(tag)  # before anything is opened
    console = console or Console()
    redis = redis_from_settings(settings)
    streams = streams_from_settings(settings) if settings.streams_apart else redis
    sampler = TopSampler(
        redis, keys=settings.keys, queue_name=settings.queue_name, streams=streams, tags=tags, limit=limit
    )
    stop = asyncio.Event()
    try:
        with _stop_on_signals(stop):
            if once or not console.is_terminal:
                await sampler.sample()  # the base of the rates
                await _sleep_unless(stop, interval)
                if not stop.is_set():
                    console.print(render(await sampler.sample(), settings=settings, interval=interval))
                return EXIT_OK
            with _stop_on_keys(stop), Live(console=console, screen=True, auto_refresh=False) as live:
                while not stop.is_set():
                    snapshot = await _unless_stopped(stop, sampler.sample())
                    if snapshot is None:
                        break
                    live.update(render(snapshot, settings=settings, interval=interval), refresh=True)
                    await _sleep_unless(stop, interval)
    finally:
        if streams is not redis:
            await streams.aclose()
        await redis.aclose()
    return EXIT_OK


# -- drawing --------------------------------------------------------------------------------------------
def render(snapshot: Snapshot, *, settings: Settings, interval: float) -> RenderableType:
    """One view of ``snapshot``: a header line, then running jobs, tag streams, groups and errors."""
    now = snapshot.taken_ms
    slots = sum(w.max_jobs for w in snapshot.workers)
    header = Text.assemble(
        ("tokenbus top", "bold"),
        time.strftime("  %H:%M:%S", time.localtime(now / 1000)),
        f"  queue {settings.queue_name}  prefix {settings.prefix}  ",
        f"{len(snapshot.workers)} live worker{'s' if len(snapshot.workers) != 1 else ''} ",
        f"({slots} slots)  {len(snapshot.running)}{'+' if snapshot.more_running else ''} running  ",
        f"{snapshot.queued} queued  ",
        (f"{snapshot.jobs_rate:.1f} tok/s", "bold green" if snapshot.jobs_rate else ""),
    )
    parts: list[RenderableType] = [header, _jobs(snapshot, now), _tags(snapshot, now)]
    if snapshot.groups:
        parts.append(_groups(snapshot))
    parts.append(_errors(snapshot, now))
    parts.append(Text(f"every {interval:g}s; q quits", style="dim"))
    return Group(*parts)


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        numeric = column in ("ATTEMPT", "TOKENS", "TOK/S", "ENTRIES", "CONSUMERS", "PENDING", "LAG")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=column in ("JOB", "TAG"))
    return table


def _rate(rate: float | None) -> str:
    return "…" if rate is None else f"{rate:.1f}"


def _jobs(snapshot: Snapshot, now: float) -> RenderableType:
    table = _table("Running jobs", "JOB", "GRAPH", "ATTEMPT", "WORKER", "AGE", "TOKENS", "TOK/S")
    for job in snapshot.running:
        s = job.status
        table.add_row(
            s.job, s.graph or "?", str(s.attempt or "-"), s.worker or "-",
            ago(s.enqueued_ms or s.last_entry_ms, now), str(s.entries), _rate(job.rate),
        )  # fmt: skip
    if not snapshot.running:
        table.add_row("(none)")
    if snapshot.more_running:
        return Group(table, _note(f"more run: the {len(snapshot.running)} oldest are shown (--limit)"))
    return table


def _tags(snapshot: Snapshot, now: float) -> RenderableType:
    table = _table("Tag streams", "TAG", "ENTRIES", "TOK/S", "LAST")
    for tag in sorted(snapshot.tags, key=lambda t: (-(t.rate or 0.0), t.tag)):
        table.add_row(tag.tag, str(tag.info.length), _rate(tag.rate), ago(tag.info.last_ms, now, " ago"))
    if not snapshot.tags:
        table.add_row("(none)")
    notes = []
    if len(snapshot.tags) < snapshot.tags_found:
        notes.append(f"the {len(snapshot.tags)} written to last of {snapshot.tags_found} found are shown")
    if not snapshot.tags_complete:
        notes.append("the search for tag streams stopped at its budget: there may be more")
    return Group(table, _note("; ".join(notes) + " (--tag names them)")) if notes else table


def _note(text: str) -> Text:
    return Text(f" {text}", style="dim")


def _groups(snapshot: Snapshot) -> RenderableType:
    table = _table("Consumer groups", "STREAM", "GROUP", "CONSUMERS", "PENDING", "LAG")
    for g in snapshot.groups:
        table.add_row(g.stream, g.group, str(g.consumers), str(g.pending), "?" if g.lag is None else str(g.lag))
    return table


def _errors(snapshot: Snapshot, now: float) -> RenderableType:
    table = _table("Recent errors", "JOB", "GRAPH", "ENDED", "ERROR")
    for s in snapshot.errors:
        message = f"{s.error_type}: {s.error}" if s.error_type else s.error
        table.add_row(s.job, s.graph or "?", ago(s.ended_ms, now, " ago"), " ".join(message.split())[:200])
    if not snapshot.errors:
        table.add_row("(none)")
    return table


# -- quitting ----------------------------------------------------------------------------------------
async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


async def _unless_stopped(stop: asyncio.Event, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None if ``stop`` is set first (a Redis slow to answer does not keep
    ``q`` waiting)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return task.result() if not task.cancelled() else None


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM quit as ``q`` does: the view is closed, the exit status 0."""
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows, or not the main thread
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        yield
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


@contextlib.contextmanager
def _stop_on_keys(stop: asyncio.Event) -> Iterator[None]:
    """Read keys as they are pressed (no Enter needed): ``q`` sets ``stop``. The terminal's mode is
    put back on the way out. Without a terminal on stdin, only signals quit."""
    if not sys.stdin.isatty():
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def pressed() -> None:
        try:
            keys = os.read(fd, 64)
        except OSError:
            keys = b""
        if not keys or QUIT_KEYS.intersection(keys):
            stop.set()  # q, or stdin closed

    tty.setcbreak(fd)
    loop.add_reader(fd, pressed)
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
