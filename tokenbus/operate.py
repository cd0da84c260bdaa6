"""The operator's subcommands: ``workers``, ``jobs``, ``status``, ``result``, ``cancel``, ``dead``.

Each is a thin shell over :class:`tokenbus.worker.client.TokenbusClient`, which has the same
functions for Python. Tables and results go to stdout (``--format jsonl``: one JSON object per
line), notices to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

import orjson

from tokenbus.consumer.dead import DeadLetter
from tokenbus.consumer.jobs import JobView
from tokenbus.exits import EXIT_INCOMPLETE, EXIT_JOB_FAILED, EXIT_NOT_ENDED, EXIT_OK
from tokenbus.schemas.entries import EntryType
from tokenbus.schemas.errors import CommandError
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.settings import Settings
from tokenbus.worker.status import JobState, JobStatus


async def workers(settings: Settings, args: argparse.Namespace) -> int:
    async with await TokenbusClient.connect(settings) as client:
        live = await client.workers()
    if args.format == "jsonl":
        _json_lines({**asdict(w), "name": w.name} for w in live)
        return EXIT_OK
    if not live:
        _notice(f"no live worker on queue {settings.queue_name} (tokenbus worker starts one)")
        return EXIT_OK
    now = _now_ms()
    rows = [(w.name, f"{w.running}/{w.max_jobs}", duration(now - w.started_ms), ", ".join(w.graphs)) for w in live]
    _table(("WORKER", "RUNNING", "UP", "GRAPHS"), rows)
    return EXIT_OK


async def jobs(settings: Settings, args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise CommandError("jobs: --limit must be 1 or more")
    async with await TokenbusClient.connect(settings) as client:
        listing = await client.jobs(limit=args.limit)
    statuses = [*listing.running, *listing.queued, *listing.finished]
    if args.format == "jsonl":
        _json_lines(s.to_dict() for s in statuses)
    else:
        now = _now_ms()
        _table(
            ("JOB", "STATE", "GRAPH", "ATTEMPT", "WORKER", "AGE", "ENTRIES", "INFO"),
            [_job_row(s, now) for s in statuses],
        )
    shown_queued = f" ({len(listing.queued)} shown)" if len(listing.queued) < listing.queued_total else ""
    live = len(listing.workers)
    _notice(
        f"{len(listing.running)} running, {listing.queued_total} queued{shown_queued}, {listing.finished_total} "
        f"finished kept ({len(listing.finished)} shown); {live} live worker{'s' if live != 1 else ''} "
        f"on queue {settings.queue_name}"
    )
    return EXIT_OK


async def status(settings: Settings, args: argparse.Namespace) -> int:
    async with await TokenbusClient.connect(settings) as client:
        job = await client.status(args.job)
    if args.format == "jsonl":
        _json_lines([job.to_dict()])
        return EXIT_OK
    now = _now_ms()
    rows = [
        ("job", job.job), ("state", job.state.value), ("graph", job.graph or "?"),
        ("attempt", str(job.attempt) if job.attempt else "none started"),
        ("worker", job.worker or "-"), ("entries", str(job.entries)),
        ("enqueued", ago(job.enqueued_ms, now, " ago")), ("last entry", ago(job.last_entry_ms, now, " ago")),
    ]  # fmt: skip
    if job.state is JobState.QUEUED and job.due_ms is not None and job.due_ms > now:
        rows.append(("due in", duration(job.due_ms - now)))
    if job.done:
        rows.append(("ended", ago(job.ended_ms, now, " ago")))
    if job.error:
        rows.append(("error", f"{job.error_type}: {job.error}" if job.error_type else job.error))
    if job.cancel_requested and not job.done:
        rows.append(("cancel", "requested"))
    for name, value in rows:
        print(f"{name:<11} {value}")
    return EXIT_OK


async def result(settings: Settings, args: argparse.Namespace) -> int:
    async with await TokenbusClient.connect(settings) as client:
        view = await client.result(args.job, wait=args.wait)
    if args.format == "jsonl":
        _json_lines([_view_json(view)])
    elif args.tag is not None or args.node is not None:
        texts, name, kind = (
            (view.texts, args.tag, "tag") if args.tag is not None else (view.node_texts, args.node, "node")
        )
        if name not in texts and view.done:
            raise CommandError(
                f"job {view.job} has no text for {kind} {name!r}; its {kind}s: {', '.join(texts) or 'none'}"
            )
        _print_text(texts.get(name, ""))
    else:
        sections = view.texts if args.by == "tag" else view.node_texts
        if not sections:
            _print_text(view.text)
        for name, text in sections.items():
            print(f"== {args.by} {name}")
            _print_text(text)
    return _result_status(view)


async def cancel(settings: Settings, args: argparse.Namespace) -> int:
    async with await TokenbusClient.connect(settings) as client:
        before = await client.status(args.job)
        if before.done:
            _notice(f"job {args.job} has already ended: {before.state.value}")
            return EXIT_JOB_FAILED
        after = await client.cancel(args.job, timeout_s=args.wait or None)
        live = await client.workers() if not after.done else []
    if after.state is JobState.CANCELLED:
        print(f"job {args.job}: cancelled")
        return EXIT_OK
    if after.done:
        print(f"job {args.job}: ended {after.state.value} before the cancel landed")
        return EXIT_JOB_FAILED
    if not live:
        print(
            f"job {args.job}: cancel requested; no live worker on queue {settings.queue_name}: "
            "it ends 'cancelled' when one takes it"
        )
    else:
        waited = f" after {args.wait:g}s" if args.wait else ""
        print(f"job {args.job}: cancel requested; it has not ended yet{waited} (tokenbus status {args.job})")
    return EXIT_OK


async def dead(settings: Settings, args: argparse.Namespace) -> int:
    if args.action != "redrive" and args.all:
        raise CommandError("dead: --all goes with redrive")
    if args.action == "list" and args.ids:
        raise CommandError("dead: list takes no ids (dead show ID shows one)")
    if args.action != "list" and not args.ids and not args.all:
        raise CommandError(f"dead {args.action}: give the ids of the dead letters (tokenbus dead lists them)")
    async with await TokenbusClient.connect(settings) as client:
        if args.action == "list":
            return _list_dead(await client.dead_letters(group=args.group, count=args.limit), args)
        if args.action == "show":
            _json_lines(letter.to_dict() for letter in await _dead_letters_by_id(client, args.ids))
            return EXIT_OK
        return await _redrive(client, args)


async def _redrive(client: TokenbusClient, args: argparse.Namespace) -> int:
    if args.all:
        if args.ids:
            raise CommandError("dead redrive: give dead letter ids or --all, not both")
        letters = await client.dead_letters(group=args.group, count=100_000)
        hopeless = [letter for letter in letters if letter.entry() is None]
        if hopeless:
            _notice(
                f"left {len(hopeless)} dead letters that are no tokenbus entries: "
                "their group would dead-letter them again"
            )
        letters = [letter for letter in letters if letter.entry() is not None]
    elif args.group:
        raise CommandError("dead redrive: --group goes with --all")
    else:
        letters = await _dead_letters_by_id(client, args.ids)
    by_id = {letter.id: letter for letter in letters}
    for dead_id, new_id in (await client.redrive(list(by_id))).items():
        print(f"{dead_id} -> {by_id[dead_id].stream} {new_id} (group {by_id[dead_id].group})")
    if not by_id:
        _notice("no dead letters to re-drive")
    return EXIT_OK


async def _dead_letters_by_id(client: TokenbusClient, ids: Sequence[str]) -> list[DeadLetter]:
    letters = []
    for dead_id in ids:
        letter = await client.dead_letter(dead_id)
        if letter is None:
            raise CommandError(f"no dead letter {dead_id} (tokenbus dead lists them)")
        letters.append(letter)
    return letters


def _list_dead(letters: Sequence[DeadLetter], args: argparse.Namespace) -> int:
    if args.format == "jsonl":
        _json_lines(letter.to_dict() for letter in letters)
        return EXIT_OK
    if not letters:
        _notice("no dead letters" + (f" of group {args.group}" if args.group else ""))
        return EXIT_OK
    rows = [(d.id, d.group, d.stream, d.job or "?", d.type or "?", d.reason) for d in letters]
    _table(("ID", "GROUP", "STREAM", "JOB", "TYPE", "REASON"), rows)
    return EXIT_OK


# -- formatting ---------------------------------------------------------------------------------------
def _job_row(job: JobStatus, now: float) -> tuple[str, ...]:
    info = ""
    if job.state is JobState.QUEUED and job.due_ms is not None and job.due_ms > now:
        info = f"due in {duration(job.due_ms - now)}"
    elif job.done:
        info = f"ended {ago(job.ended_ms, now, ' ago')}" + (f": {job.error}" if job.error else "")
    if job.cancel_requested and not job.done:
        info = "cancel requested"
    return (
        job.job, job.state.value, job.graph or "?", str(job.attempt or "-"), job.worker or "-",
        ago(job.enqueued_ms or job.last_entry_ms, now), str(job.entries), info[:120],
    )  # fmt: skip


def _view_json(view: JobView) -> dict[str, Any]:
    timings = {"started_ms": view.started_ts, "first_chunk_ms": view.first_chunk_ts, "ended_ms": view.ended_ts}
    return {
        "job": view.job, "status": view.status.value if view.status else "running", "attempt": view.attempt,
        "chunks": view.chunks, "text": view.text, "texts": view.texts, "node_texts": view.node_texts,
        "error": view.error, "complete": view.complete, "missing": view.missing, "result": view.result,
        "timings": timings,
    }  # fmt: skip


def _result_status(view: JobView) -> int:
    """Tell on stderr what the text printed is not (whole, final, a success); the exit status too."""
    if not view.complete and view.attempt:
        _notice(
            f"job {view.job}: {view.missing} entries of attempt {view.attempt} were trimmed: the text is incomplete"
        )
    if not view.done:
        state = f"running (attempt {view.attempt})" if view.attempt else "queued"
        _notice(f"job {view.job} is {state}: this is the text so far (--wait waits for the end)")
        return EXIT_NOT_ENDED
    if view.status in (EntryType.ERROR, EntryType.CANCELLED):
        _notice(f"job {view.job}: {view.status.value}" + (f": {view.error}" if view.error else ""))
        return EXIT_JOB_FAILED
    return EXIT_OK if view.complete else EXIT_INCOMPLETE


def _print_text(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    sys.stdout.flush()


def _json_lines(items: Iterable[dict[str, Any]]) -> None:
    for item in items:
        sys.stdout.write(orjson.dumps(item).decode() + "\n")
    sys.stdout.flush()


def _notice(text: str) -> None:
    print(f"[tokenbus] {text}", file=sys.stderr, flush=True)


def _now_ms() -> float:
    return time.time() * 1000


def ago(ms: int | None, now: float, suffix: str = "") -> str:
    return "-" if ms is None else duration(now - ms) + suffix


def duration(ms: float) -> str:
    s = max(ms, 0) / 1000
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    if s < 86_400:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 86_400)}d{int(s % 86_400 // 3600):02d}h"
