"""``tokenbus``: run workers, enqueue jobs, tail streams, run the demo, print ACL roles."""

from __future__ import annotations

import argparse
import asyncio
import logging.config
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from pydantic import ValidationError

from tokenbus.logs import LOG_FORMATS, logging_config
from tokenbus.schemas.errors import TokenbusError
from tokenbus.schemas.job import STREAM_MODES

logger = logging.getLogger(__name__)

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:  # noqa: PLR0915  # one statement per option
    parser = argparse.ArgumentParser(prog="tokenbus", description=__doc__)
    parser.add_argument(
        "--log-level",
        help="DEBUG, INFO, WARNING (logs go to stderr; default INFO, WARNING for demo and tail)",
    )
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, default="plain",
        help="plain lines, or json: one object per line, with job_id, attempt and graph where a line is about a job",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("worker", help="run an arq worker that runs graph jobs")
    p.add_argument(
        "--app-dir", default=".", help="directory put first on the import path for TOKENBUS_GRAPHS (default: here)"
    )
    p.add_argument("--burst", action="store_true", help="exit once the queue is empty")

    p = sub.add_parser("enqueue", help="enqueue a graph job and print its id")
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
    p.add_argument("--config", default="{}", help="JSON passed to the graph as config['configurable']")
    p.add_argument("--follow", action="store_true", help="print the job's tokens until it ends")
    _add_output_args(p)

    p = sub.add_parser("tail", help="print entries of tag or job streams as they arrive")
    p.add_argument("--tag", action="append", dest="tags", default=[], help="tag stream to follow (repeatable)")
    p.add_argument("--job", action="append", dest="jobs", default=[], help="only this job (repeatable)")
    p.add_argument("--node", action="append", dest="nodes", default=[], help="only entries from this node")
    p.add_argument("--type", action="append", dest="types", default=[], help="only entries of this type")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--from-start", action="store_true", help="read what the streams hold, then follow")
    start.add_argument("--from", dest="from_id", help="resume after this entry id")
    p.add_argument("--group", help="read through this consumer group (XREADGROUP + XACK)")
    p.add_argument("--consumer", help="consumer name within --group")
    p.add_argument("--until-final", action="store_true", help="exit after the followed jobs end")
    _add_output_args(p)

    p = sub.add_parser("groups", help="show consumer groups of tag streams: consumers, pending, lag")
    p.add_argument("--tag", action="append", dest="tags", required=True, help="tag stream (repeatable)")

    p = sub.add_parser("demo", help="the LangGraph how-to end to end: joke and poem tokens by tag")
    p.add_argument("--topic", default="cats")
    p.add_argument(
        "--redis", choices=["auto", "server", "fake"], default="auto",
        help="without REDIS_URL: a private redis-server (auto: when installed) or embedded fakeredis",
    )  # fmt: skip

    p = sub.add_parser("acl", help="print ACL SETUSER rules for a least-privilege Redis user (pipe into redis-cli)")
    p.add_argument("role", metavar="ROLE", help="worker, enqueuer, reader (of --tag streams) or gateway")
    p.add_argument("--user", help="the user's name (default: tokenbus-ROLE)")
    p.add_argument("--password", help="the user's password (default: a new one, printed on stderr)")
    p.add_argument(
        "--tag", action="append", dest="tags", default=[], help="tag stream to read (repeatable; gateway: all)"
    )
    p.add_argument("--groups", action="store_true", help="reader, gateway: also read through consumer groups")

    p = sub.add_parser("serve", help="run the HTTP/SSE gateway: jobs and their tokens for browsers")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--proxy-headers", action="store_true", help="trust X-Forwarded-For from --forwarded-allow-ips")
    p.add_argument("--forwarded-allow-ips", default="127.0.0.1", help="proxies whose X-Forwarded-* are trusted")

    p = sub.add_parser("model-server", help="serve the offline OpenAI-compatible model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8400)
    p.add_argument("--tokens-per-s", type=float, default=0.0, help="pace tokens (0: as fast as possible)")
    p.add_argument("--fault", action="append", default=[], help="MATCH:status|error|disconnect|stall[:AFTER]")
    return parser


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["text", "jsonl"], default="text")
    p.add_argument("--sep", default="", help="text printed after each token (the how-to uses '|')")


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
    default_level = "INFO" if args.command in ("worker", "model-server", "serve") else "WARNING"
    configure_logging(args.log_level or default_level, args.log_format)
    from tokenbus import commands
    from tokenbus.worker.settings import Settings

    try:
        settings = Settings()
    except ValidationError as e:
        print(f"tokenbus: bad configuration: {e}", file=sys.stderr)
        return EXIT_USAGE
    handler: Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]] = getattr(
        commands, args.command.replace("-", "_")
    )
    try:
        if args.command == "worker":
            commands.use_app_dir(args.app_dir)
        return run(handler(settings, args))
    except TokenbusError as e:
        print(f"tokenbus: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
