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
from redis import exceptions as redis_errors

from tokenbus.consumer.attempts import Restart
from tokenbus.consumer.groups import GroupConsumer, group_stats
from tokenbus.consumer.output import Printer
from tokenbus.consumer.reader import BEGINNING, LATEST, Gap, latest_positions
from tokenbus.consumer.subscribe import streams_for, subscribe
from tokenbus.exits import EXIT_INCOMPLETE, EXIT_JOB_FAILED, EXIT_NOT_ENDED, EXIT_OK, EXIT_USAGE
from tokenbus.operate import cancel, dead, jobs, result, status, workers
from tokenbus.schemas.entries import Entry, EntryType
from tokenbus.schemas.errors import CommandError, InvalidJobRequest
from tokenbus.schemas.job import ALL_MODES
from tokenbus.worker.offline_model import Fault, OfflineModelServer
from tokenbus.worker.presence import live_workers
from tokenbus.worker.redis_client import StreamsRedis, streams_from_settings
from tokenbus.worker.settings import Settings

__all__ = ["cancel", "dead", "jobs", "result", "status", "workers"]  # commands of their own module

logger = logging.getLogger(__name__)

READ_BLOCK_MS = 5000
GATEWAY_GC_THRESHOLDS = (700, 10, 1000)
"""The gateway's garbage-collector thresholds: Python's young generation (a pass over at most ~700
new objects is short, so no client's event waits long behind one), and full passes a hundred
times rarer than Python's default (what is loaded at start is frozen; the rest is mostly
short-lived). The worker's larger young generation made the gateway's p99 latency 2-3x longer
(BENCHMARKS.md, "Gateway")."""


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
    if not isinstance(config, dict):
        kind = type(config).__name__
        raise InvalidJobRequest(f"--config must be a JSON object, such as '{{\"key\": 1}}', not a {kind}")
    async with await TokenbusClient.connect(settings) as client:
        workers = await client.check_graph(args.graph)  # UnknownGraph: the graphs live workers serve
        job_id = await client.enqueue(
            args.graph,
            args.input,
            modes=args.mode or ALL_MODES,
            tags=args.tags,
            job_id=args.job_id,
            timeout_s=args.timeout,
            config=config,
            check_graph=False,
        )
    if args.format == "jsonl":  # only JSON lines on stdout: the id is one of them
        print(orjson.dumps({"type": "enqueued", "job": job_id}).decode(), flush=True)
    else:
        print(job_id, flush=True)
    if workers == []:
        print(
            f"[tokenbus] no live worker on queue {settings.queue_name}: job {job_id} waits until one starts "
            "(tokenbus worker)",
            file=sys.stderr, flush=True,
        )  # fmt: skip
    if not args.follow:
        return EXIT_OK
    return await _follow(settings, args, jobs=[job_id], tags=[], start=BEGINNING, wait_timeout=args.wait_timeout)


async def tail(settings: Settings, args: argparse.Namespace) -> int:
    if not args.tags and not args.jobs:
        raise CommandError("tail: give --tag (repeatable) or --job")
    if args.until_final and not args.jobs:
        raise CommandError("tail: --until-final stops once the jobs of --job end: give --job too")
    if args.group:
        return await _tail_group(settings, args)
    start = BEGINNING if args.from_start else (args.from_id or LATEST)
    return await _follow(settings, args, jobs=args.jobs, tags=args.tags, start=start)


async def _follow(
    settings: Settings, args: argparse.Namespace, *, jobs: list[str], tags: list[str], start: str,
    wait_timeout: float = 0,
) -> int:  # fmt: skip
    """Print entries until interrupted, or until the followed jobs end; non-zero if one failed
    (1) or if entries were trimmed unread (3). ``wait_timeout`` (one job): if the job has not
    started after that many seconds, say so; and stop (4) if no worker is live to start it."""
    label = len(jobs) != 1 or len(tags) > 1  # text of several jobs (or tags) at once
    printer = Printer(sys.stdout, sys.stderr, format=args.format, sep=args.sep, label=label, tags=tags)
    redis = streams_from_settings(settings)  # the workers' records live with the streams too
    failed = incomplete = False
    until_final = bool(jobs) and (not tags or getattr(args, "until_final", False))
    streams = streams_for(settings.keys, tags, jobs)
    watch: _StartWatch | None = None
    try:
        # Resolve the start now, so the notice below tells exactly where reading begins.
        resume = await latest_positions(redis, streams) if start == LATEST else dict.fromkeys(streams, start)
        printer.notice("following " + ", ".join(f"{s} after {i}" for s, i in resume.items()))
        async with asyncio.timeout(None) as deadline:
            started = asyncio.Event()
            if wait_timeout:
                watch = _StartWatch(settings, redis, printer, jobs[0], wait_timeout, started, deadline)
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
                started.set()
                printer.show(item)
                if isinstance(item, Gap):
                    incomplete = True
                elif item.type in (EntryType.ERROR, EntryType.CANCELLED) and not getattr(item, "retry", False):
                    failed = True
    except TimeoutError:
        if watch is None or not watch.no_worker:
            raise
        return EXIT_NOT_ENDED
    finally:
        if watch is not None:
            await watch.close()
        await redis.aclose()
    return EXIT_JOB_FAILED if failed else EXIT_INCOMPLETE if incomplete else EXIT_OK


class _StartWatch:
    """While a followed job has not started: every ``after_s`` seconds, look for live workers of
    its queue; with none, say so and end the follow (through ``deadline``); with some, say once
    that the job waits behind others."""

    def __init__(
        self, settings: Settings, redis: StreamsRedis, printer: Printer, job_id: str, after_s: float,
        started: asyncio.Event, deadline: asyncio.Timeout,
    ) -> None:  # fmt: skip
        self._settings, self._redis, self._printer, self._job_id = settings, redis, printer, job_id
        self._after_s, self._started, self._deadline = after_s, started, deadline
        self.no_worker = False
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        queue = self._settings.queue_name
        told = False
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._after_s):
                    await self._started.wait()
            if self._started.is_set():
                return
            try:
                workers = await live_workers(self._redis, self._settings.keys, queue=queue)
            except redis_errors.NoPermissionError:  # a user made before the workers' records: cannot tell
                return
            if not workers:
                self._printer.notice(
                    f"job {self._job_id}: no live worker on queue {queue} has taken it after {self._after_s:g}s; "
                    "it stays queued: start one (tokenbus worker), or cancel it (tokenbus cancel)"
                )
                self.no_worker = True
                self._deadline.reschedule(asyncio.get_running_loop().time())
                return
            if not told:
                ahead = "some"
                with contextlib.suppress(redis_errors.NoPermissionError):  # an enqueuer's user may not read the queue
                    ahead = str(await self._redis.zrank(queue, self._job_id) or 0)
                self._printer.notice(
                    f"job {self._job_id} has not started after {self._after_s:g}s: {len(workers)} live workers "
                    f"on queue {queue}, {ahead} jobs ahead of it (tokenbus jobs)"
                )
                told = True

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _tail_group(settings: Settings, args: argparse.Namespace) -> int:
    """``tokenbus tail --group G --consumer C``: print entries, acking each once printed."""
    if not args.consumer:
        raise CommandError("tail: --group needs --consumer")
    keys = settings.keys
    label = len(args.jobs) != 1 or len(args.tags) > 1  # text of several jobs (or tags) at once
    printer = Printer(sys.stdout, sys.stderr, format=args.format, sep=args.sep, label=label, tags=args.tags)
    redis = streams_from_settings(settings, socket_timeout=30)
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
    redis = streams_from_settings(settings)
    try:
        stats = await group_stats(redis, [settings.keys.tag(t) for t in args.tags])
    finally:
        await redis.aclose()
    print(f"{'stream':<40} {'group':<20} {'consumers':>9} {'pending':>8} {'lag':>8}  last delivered")
    for s in stats:
        lag = "?" if s.lag is None else str(s.lag)
        print(f"{s.stream:<40} {s.group:<20} {s.consumers:>9} {s.pending:>8} {lag:>8}  {s.last_delivered}")
    return EXIT_OK


async def top(settings: Settings, args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise CommandError("top: --limit must be 1 or more")
    with needs_extra("top"):
        from tokenbus.top import run_top

    return await run_top(settings, interval=args.interval, tags=args.tags, limit=args.limit, once=args.once)


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
