"""The ``tokenbus`` subcommands; each takes the settings and the parsed arguments."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
from pydantic import ValidationError

from tokenbus.consumer.attempts import Restart
from tokenbus.consumer.groups import GroupConsumer, group_stats
from tokenbus.consumer.output import Printer
from tokenbus.consumer.reader import BEGINNING, LATEST, Gap, latest_positions
from tokenbus.consumer.subscribe import streams_for, subscribe
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.schemas.errors import CommandError, InvalidJobRequest
from tokenbus.schemas.job import ALL_MODES
from tokenbus.worker.offline_model import Fault, OfflineModelServer
from tokenbus.worker.redis_client import redis_from_settings
from tokenbus.worker.settings import Settings

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INCOMPLETE = 3
"""``tail``/``--follow``: entries were trimmed before they were read (a gap was reported)."""
READ_BLOCK_MS = 5000
GATEWAY_GC_THRESHOLDS = (50_000, 20, 100)
"""The gateway's garbage-collector thresholds: the worker's (``tokenbus.worker.app.GC_THRESHOLDS``,
which an install without the worker extra cannot import), for the same reason."""


@contextlib.contextmanager
def needs_extra(extra: str) -> Iterator[None]:
    """Turn the import error of a module of a pip extra into one line that says what to install."""
    try:
        yield
    except ModuleNotFoundError as e:
        raise CommandError(f"this command needs {e.name}: pip install 'tokenbus[{extra}]'") from e


def use_app_dir(directory: str) -> None:
    """Put the application's directory first on the import path, as uvicorn and celery do: the
    graphs of ``TOKENBUS_GRAPHS`` import from there."""
    app_dir = Path(directory).resolve()
    if not app_dir.is_dir():
        raise CommandError(f"--app-dir {directory}: no such directory")
    sys.path.insert(0, str(app_dir))


async def worker(settings: Settings, args: argparse.Namespace) -> int:
    with needs_extra("worker"):
        from tokenbus.worker.app import build_worker

    arq_worker = build_worker(settings, burst=args.burst)
    try:
        await arq_worker.async_run()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # arq cancels its main task on SIGINT/SIGTERM once running jobs are done or re-queued
    finally:
        await arq_worker.close()
    return EXIT_OK


async def enqueue(settings: Settings, args: argparse.Namespace) -> int:
    from tokenbus.worker.client import TokenbusClient

    try:
        config = orjson.loads(args.config)
    except orjson.JSONDecodeError as e:
        raise InvalidJobRequest(f"--config is not valid JSON: {e}") from e
    async with await TokenbusClient.connect(settings) as client:
        job_id = await client.enqueue(
            args.graph,
            args.input,
            modes=args.mode or ALL_MODES,
            tags=args.tags,
            job_id=args.job_id,
            timeout_s=args.timeout,
            config=config,
        )
    print(job_id, flush=True)
    if not args.follow:
        return EXIT_OK
    return await _follow(settings, args, jobs=[job_id], tags=[], start=BEGINNING)


async def tail(settings: Settings, args: argparse.Namespace) -> int:
    if not args.tags and not args.jobs:
        raise SystemExit("tokenbus tail: give --tag (repeatable) or --job")
    if args.group:
        return await _tail_group(settings, args)
    start = BEGINNING if args.from_start else (args.from_id or LATEST)
    return await _follow(settings, args, jobs=args.jobs, tags=args.tags, start=start)


async def _follow(settings: Settings, args: argparse.Namespace, *, jobs: list[str], tags: list[str], start: str) -> int:
    """Print entries until interrupted, or until the followed jobs end; non-zero if one failed
    (1) or if entries were trimmed unread (3)."""
    printer = Printer(sys.stdout, sys.stderr, format=args.format, sep=args.sep)
    redis = redis_from_settings(settings)
    failed = incomplete = False
    until_final = bool(jobs) and (not tags or getattr(args, "until_final", False))
    streams = streams_for(settings.keys, tags, jobs)
    try:
        # Resolve the start now, so the notice below tells exactly where reading begins.
        resume = await latest_positions(redis, streams) if start == LATEST else dict.fromkeys(streams, start)
        printer.notice("following " + ", ".join(f"{s} after {i}" for s, i in resume.items()))
        async for item in subscribe(
            redis,
            tags=tags,
            jobs=jobs,
            nodes=getattr(args, "nodes", ()),
            types=getattr(args, "types", ()),
            prefix=settings.prefix,
            resume=resume,
            until_final=until_final,
            block_ms=READ_BLOCK_MS,
            parse_json=True,  # an entry with broken data or meta is skipped with a warning, not printed
        ):
            printer.show(item)
            if isinstance(item, Gap):
                incomplete = True
            elif item.type in (EntryType.ERROR, EntryType.CANCELLED) and not getattr(item, "retry", False):
                failed = True
    finally:
        await redis.aclose()
    return EXIT_JOB_FAILED if failed else EXIT_INCOMPLETE if incomplete else EXIT_OK


async def _tail_group(settings: Settings, args: argparse.Namespace) -> int:
    """``tokenbus tail --group G --consumer C``: print entries, acking each once printed."""
    if not args.consumer:
        raise SystemExit("tokenbus tail: --group needs --consumer")
    keys = settings.keys
    printer = Printer(sys.stdout, sys.stderr, format=args.format, sep=args.sep)
    redis = redis_from_settings(settings, socket_timeout=30)
    open_jobs = set(args.jobs) if args.jobs and args.until_final else None
    stop = asyncio.Event()

    async def show(entry: Entry) -> None:
        wanted = not args.jobs or entry.job in args.jobs
        if wanted and (not args.types or entry.type in args.types) and (not args.nodes or entry.node in args.nodes):
            printer.show(entry)  # raises MalformedEntry on broken data or meta: the group dead-letters it
        if wanted and open_jobs is not None and entry.is_final:
            open_jobs.discard(entry.job)
            if not open_jobs:
                stop.set()

    async def restarted(restart: Restart) -> None:
        if not args.jobs or restart.job in args.jobs:
            printer.show(restart)

    try:
        consumer = GroupConsumer(
            redis, [keys.tag(t) for t in args.tags], args.group, args.consumer, keys=keys,
            start="0" if args.from_start else LATEST,
        )  # fmt: skip
        await consumer.run(show, stop=stop, on_restart=restarted)
    finally:
        await redis.aclose()
    return EXIT_OK


async def groups(settings: Settings, args: argparse.Namespace) -> int:
    redis = redis_from_settings(settings)
    try:
        stats = await group_stats(redis, [settings.keys.tag(t) for t in args.tags])
    finally:
        await redis.aclose()
    print(f"{'stream':<40} {'group':<20} {'consumers':>9} {'pending':>8} {'lag':>8}  last delivered")
    for s in stats:
        lag = "?" if s.lag is None else str(s.lag)
        print(f"{s.stream:<40} {s.group:<20} {s.consumers:>9} {s.pending:>8} {lag:>8}  {s.last_delivered}")
    return EXIT_OK


async def demo(settings: Settings, args: argparse.Namespace) -> int:
    with needs_extra("demo"):
        from tokenbus.demo import run_demo

    return await run_demo(settings, topic=args.topic, redis=args.redis, out=sys.stdout)


async def acl(settings: Settings, args: argparse.Namespace) -> int:
    """Print the ``ACL SETUSER`` line of one role's user; a generated password goes to stderr."""
    from tokenbus.acl import AclRequest, command_line, default_user, generate_password, setuser_command

    password = args.password or generate_password()
    request = AclRequest(
        role=args.role, user=args.user or default_user(args.role), password=password,
        tags=tuple(args.tags), groups=args.groups,
    )  # fmt: skip
    line = command_line(setuser_command(request, keys=settings.keys, queue_name=settings.queue_name))
    print(line, flush=True)
    if not args.password:
        print(f"tokenbus: password of user {request.user}: {password}", file=sys.stderr)
    return EXIT_OK


async def model_server(settings: Settings, args: argparse.Namespace) -> int:
    faults = [Fault.parse(spec) for spec in args.fault]
    server = OfflineModelServer(args.host, args.port, tokens_per_s=args.tokens_per_s, faults=faults)
    async with server:
        print(server.base_url, flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await server.serve_forever()
    return EXIT_OK


async def serve(settings: Settings, args: argparse.Namespace) -> int:
    """Run the HTTP/SSE gateway under uvicorn until SIGINT/SIGTERM."""
    with needs_extra("gateway"):
        import uvicorn

        from tokenbus.gateway import GatewaySettings, create_app

    try:
        gateway = GatewaySettings()
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise CommandError(f"bad gateway configuration: {problems}") from e
    try:  # bound here, so that a taken port is one line, not a startup failure in uvicorn's log
        listener = socket.create_server((args.host, args.port), family=_family(args.host), reuse_port=False)
    except OSError as e:
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
    config = uvicorn.Config(
        create_app(settings, gateway), host=args.host, port=args.port, log_config=None, lifespan="on",
        access_log=args.access_log, timeout_graceful_shutdown=5, proxy_headers=args.proxy_headers,
        forwarded_allow_ips=args.forwarded_allow_ips,
    )  # fmt: skip
    server = uvicorn.Server(config)
    # The hub's windows hold thousands of decoded entries (dicts, lists): with Python's default
    # thresholds the collector walks them all every few thousand events, pausing every client at
    # once. What is loaded by now lives as long as the process: frozen out of the collector's passes.
    gc.freeze()
    gc.set_threshold(*GATEWAY_GC_THRESHOLDS)
    host = f"[{args.host}]" if ":" in args.host else args.host
    logger.info("gateway listening on http://%s:%d (connections wait until it has started)", host, args.port)
    with listener:
        await server.serve(sockets=[listener])
    return EXIT_OK if server.started else EXIT_USAGE


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
