"""Logging for the ``tokenbus`` commands: plain lines for people, or one JSON object per line.

Configured once, by the CLI (:func:`logging_config`); the library only logs. Each record gets
the job it is about (``job_id``, ``attempt``, ``graph``: :mod:`tokenbus.worker.log_context`),
which the JSON format shows as fields of their own. Model HTTP requests (``httpx2``'s, and
``httpx``'s, ``HTTP Request: POST ...`` lines) are DEBUG, not INFO: a worker logs one per model
call, and at INFO they would drown what an operator needs.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson

from tokenbus.worker.log_context import FIELDS

LOG_FORMATS = ("plain", "json")
HTTP_CLIENTS = ("httpx", "httpx2")
"""Loggers whose INFO lines are each HTTP request a client sends: shown at DEBUG."""
HTTP_TRANSPORTS = ("httpcore", "httpcore2")
"""Loggers of connection-level detail: warnings only."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, the
    job's ``job_id``, ``attempt`` and ``graph`` when the line is about one, and ``exc`` (the
    traceback, newlines escaped) when it carries an exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


class DebugOnly(logging.Filter):
    """Lowers a logger's INFO lines to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def logging_config(level: str, log_format: str = "plain") -> dict[str, Any]:
    """The ``logging.config.dictConfig`` of a command: everything to stderr at ``level``."""
    level = level.upper()
    formatter: dict[str, Any] = (
        {"()": JsonFormatter} if log_format == "json" else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    debug = level == "DEBUG"
    loggers: dict[str, Any] = {
        # below DEBUG nothing of theirs is shown; at DEBUG their requests are, as DEBUG lines
        **{name: {"level": "DEBUG" if debug else "WARNING", "filters": ["debug_only"]} for name in HTTP_CLIENTS},
        **{name: {"level": "WARNING"} for name in HTTP_TRANSPORTS},
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "filters": {
            "job": {"()": "tokenbus.worker.log_context.JobContextFilter"},
            "debug_only": {"()": DebugOnly},
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "main",
                "filters": ["job"],
            }
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": loggers,
    }
