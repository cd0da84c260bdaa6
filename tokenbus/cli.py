"""``tokenbus``: run workers, enqueue jobs, tail streams, run the demo, print ACL roles."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging.config
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeAlias

from pydantic import ValidationError
from pydantic_settings import SettingsError
from redis import exceptions as redis_errors

from tokenbus.exits import EXIT_CLOSED_PIPE, EXIT_INTERRUPTED, EXIT_USAGE
from tokenbus.logs import LOG_FORMATS, logging_config
from tokenbus.schemas.entries import EntryType
from tokenbus.schemas.errors import TokenbusError
from tokenbus.schemas.job import STREAM_MODES

logger = logging.getLogger(__name__)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LONG_RUNNING = ("worker", "model-server", "serve")
"""Commands that log at INFO by default; the others log warnings only."""
CHECK_REDIS_FIRST = ("enqueue", "tail", "groups", "workers", "jobs", "status", "result", "cancel", "dead", "top")
"""Commands that connect to Redis at once: a Redis they cannot use fails them in one line."""


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (argparse prints the usage and the error on two)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tokenbus", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tokenbus {importlib.metadata.version('tokenbus')}")
    _add_global_options(parser, default=None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    _add_worker_commands(sub)
    _add_stream_commands(sub)
    _add_job_commands(sub)
    _add_other_commands(sub)
    return parser


Commands: TypeAlias = "argparse._SubParsersAction[Parser]"


def _add_global_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    parser.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, default=default,
        help="logs go to stderr; default INFO for worker, serve and model-server, WARNING for the others; "
        "DEBUG also shows the traceback of an error",
    )  # fmt: skip
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, default="plain" if default is None else default,
        help="plain lines, or json: one object per line, with job_id, attempt and graph where a line is about a job",
    )  # fmt: skip


def _global_options() -> Parser:
    """The global options, for every command too (`tokenbus worker --log-level DEBUG`); given
    after the command, they win over the same given before it."""
    options = Parser(add_help=False)
    _add_global_options(options, default=argparse.SUPPRESS)
    return options


def _command(commands: Commands, name: str, *, help: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help, parents=[_global_options()])
    return parser


def _add_worker_commands(sub: Commands) -> None:
    p = _command(sub, "worker", help="run an arq worker that runs graph jobs")
    p.add_argument(
        "--app-dir", default=".", help="directory put first on the import path for TOKENBUS_GRAPHS (default: here)"
    )
    p.add_argument("--burst", action="store_true", help="exit once the queue is empty")

    p = _command(sub, "enqueue", help="enqueue a graph job and print its id")
    p.add_argument("graph", help="registered graph name, e.g. joke_poem")
    p.add_argument("--input", default="{}", help="graph input as a JSON object")
    p.add_argument(
        "--mode",
        action="append",
        choices=STREAM_MODES,
        help="stream mode to publish (repeatable; default messages and custom)",
    )
    p.add_argument("--tag", action="append", dest="tags", help="only fan out chunks with these tags (repeatable)")
    p.add_argument("--job-id", help="idempotency key: the same id is never run twice")
    p.add_argument("--timeout", type=float, help="job timeout in seconds")
    p.add_argument("--config", default="{}", help="JSON object passed to the graph as config['configurable']")
    p.add_argument("--follow", action="store_true", help="print the job's tokens until it ends")
    p.add_argument(
        "--wait-timeout", type=float, default=10.0, metavar="S",
        help="--follow: if no worker has taken the job after S seconds, say so, and exit 4 when no worker is "
        "live (default 10; 0: wait silently)",
    )  # fmt: skip
    _add_output_args(p)

    p = _command(sub, "workers", help="list the live workers: graphs served, running jobs")
    _add_format_arg(p)


def _add_stream_commands(sub: Commands) -> None:
    p = _command(sub, "tail", help="print entries of tag or job streams as they arrive")
    p.add_argument("--tag", action="append", dest="tags", default=[], help="tag stream to follow (repeatable)")
    p.add_argument("--job", action="append", dest="jobs", default=[], help="only this job (repeatable)")
    p.add_argument("--node", action="append", dest="nodes", default=[], help="only entries from this node")
    p.add_argument(
        "--type", action="append", dest="types", default=[], choices=[t.value for t in EntryType], metavar="TYPE",
        help=f"only entries of this type ({', '.join(t.value for t in EntryType)}; repeatable)",
    )  # fmt: skip
    start = p.add_mutually_exclusive_group()
    start.add_argument("--from-start", action="store_true", help="read what the streams hold, then follow")
    start.add_argument("--from", dest="from_id", help="resume after this entry id")
    p.add_argument("--group", help="read through this consumer group (XREADGROUP + XACK)")
    p.add_argument("--consumer", help="consumer name within --group")
    p.add_argument("--until-final", action="store_true", help="exit after the followed jobs (--job) end")
    _add_output_args(p)

    p = _command(sub, "groups", help="show consumer groups of tag streams: consumers, pending, lag")
    p.add_argument("--tag", action="append", dest="tags", required=True, help="tag stream (repeatable)")

    p = _command(sub, "dead", help="list, show or re-drive the entries consumer groups dead-lettered")
    p.add_argument(
        "action", nargs="?", choices=["list", "show", "redrive"], default="list",
        help="list the newest (the default); show IDs in full, as JSON; redrive IDs (or --all): hand them back "
        "to their group, appended to their stream again",
    )  # fmt: skip
    p.add_argument("ids", nargs="*", metavar="ID", help="ids of dead letters (in <prefix>:dead)")
    p.add_argument("--group", help="list, redrive --all: only those of this consumer group")
    p.add_argument("--limit", type=int, default=20, help="list: at most this many, newest first (default 20)")
    p.add_argument("--all", action="store_true", help="redrive: every dead letter (of --group, if given)")
    _add_format_arg(p)


def _add_job_commands(sub: Commands) -> None:
    p = _command(sub, "jobs", help="list running, queued and recently finished jobs")
    p.add_argument("--limit", type=int, default=20, help="at most this many of each (default 20)")
    _add_format_arg(p)

    p = _command(sub, "top", help="a live view: running jobs and tag streams with their tokens/s, group lag, errors")
    p.add_argument("--interval", type=_positive, default=1.0, metavar="S", help="seconds between refreshes (default 1)")
    p.add_argument(
        "--tag", action="append", dest="tags", default=[],
        help="show this tag stream (repeatable; default: the newest found by SCAN, every 10 s)",
    )  # fmt: skip
    p.add_argument("--limit", type=int, default=20, help="at most this many running jobs (default 20)")
    p.add_argument("--once", action="store_true", help="print one view (rates over one interval) and exit")

    p = _command(
        sub, "status", help="where a job is: queued, running (attempt, worker, entries so far) or how it ended"
    )
    p.add_argument("job", metavar="ID")
    _add_format_arg(p)

    p = _command(sub, "result", help="a job's final text, per tag (or per node)")
    p.add_argument("job", metavar="ID")
    p.add_argument("--by", choices=["tag", "node"], default="tag", help="text per tag (default) or per node")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--tag", help="print only this tag's text, as it is")
    only.add_argument("--node", help="print only this node's text, as it is")
    p.add_argument("--wait", action="store_true", help="wait for the job to end first")
    _add_format_arg(p)

    p = _command(sub, "cancel", help="cancel a queued or running job; it ends 'cancelled'")
    p.add_argument("job", metavar="ID")
    p.add_argument(
        "--wait", type=float, default=10.0, metavar="S",
        help="wait up to S seconds for the job to end (default 10; 0: only ask)",
    )  # fmt: skip


def _add_other_commands(sub: Commands) -> None:
    p = _command(sub, "demo", help="the LangGraph how-to end to end: joke and poem tokens by tag")
    p.add_argument("--topic", default="cats")
    p.add_argument(
        "--redis", choices=["auto", "server", "fake"], default="auto",
        help="without REDIS_URL: a private redis-server (auto: when installed) or embedded fakeredis",
    )  # fmt: skip

    p = _command(sub, "acl", help="print ACL SETUSER rules for a least-privilege Redis user (pipe into redis-cli)")
    p.add_argument("role", metavar="ROLE", help="worker, enqueuer, reader (of --tag streams) or gateway")
    p.add_argument("--user", help="the user's name (default: tokenbus-ROLE)")
    p.add_argument("--password", help="the user's password (default: a new one, printed on stderr)")
    p.add_argument(
        "--tag", action="append", dest="tags", default=[], help="tag stream to read (repeatable; gateway: all)"
    )
    p.add_argument("--groups", action="store_true", help="reader, gateway: also read through consumer groups")

    p = _command(sub, "serve", help="run the HTTP/SSE gateway: jobs and their tokens for browsers")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--proxy-headers", action="store_true", help="trust X-Forwarded-For from --forwarded-allow-ips")
    p.add_argument("--forwarded-allow-ips", default="127.0.0.1", help="proxies whose X-Forwarded-* are trusted")

    p = _command(sub, "model-server", help="serve the offline OpenAI-compatible model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8400)
    p.add_argument("--tokens-per-s", type=float, default=0.0, help="pace tokens (0: as fast as possible)")
    p.add_argument("--fault", action="append", default=[], help="MATCH:status|error|disconnect|stall[:AFTER]")


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {value}")
    return number


def _add_output_args(p: argparse.ArgumentParser) -> None:
    _add_format_arg(p)
    p.add_argument("--sep", default="", help="text printed after each token (the how-to uses '|')")


def _add_format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["text", "jsonl"], default="text", help="text for people, JSON lines to pipe")


def configure_logging(level: str, log_format: str = "plain") -> None:
    logging.config.dictConfig(logging_config(level, log_format))


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop where available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level or ("INFO" if args.command in LONG_RUNNING else "WARNING"), args.log_format)
    from tokenbus.problems import queue_problem, settings_problem
    from tokenbus.worker.settings import Settings

    settings: Settings | None = None
    try:
        settings = Settings()
        return run(_run_command(settings, args))
    except (ValidationError, SettingsError) as e:
        return _failed(settings_problem(e), e)
    except TokenbusError as e:
        return _failed(str(e), e)
    except redis_errors.RedisError as e:
        return _failed(queue_problem(e, settings), e)
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_CLOSED_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


async def _run_command(settings: Any, args: argparse.Namespace) -> int:
    from tokenbus import commands
    from tokenbus.problems import check_redis

    handler: Callable[[Any, argparse.Namespace], Coroutine[Any, Any, int]] = getattr(
        commands, args.command.replace("-", "_")
    )
    if args.command == "worker":
        commands.use_app_dir(args.app_dir)
        await check_redis(settings, wait_if_down=True)  # a worker waits for Redis; not for a wrong password
    elif args.command in CHECK_REDIS_FIRST:
        await check_redis(settings)
    return await handler(settings, args)


def _failed(message: str, error: BaseException) -> int:
    """One line on stderr, and exit status 2; the traceback only at ``--log-level DEBUG``."""
    logger.debug("what failed, in full:", exc_info=error)
    print(f"tokenbus: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def _drop_stdout() -> None:
    """Stdout's reader has gone: send what Python still holds for it (flushed at exit) nowhere,
    so that the exit is quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
