"""The job a log line is about: its id, attempt and graph, carried by a context variable.

A worker runs each job in a task of its own (arq's ``run_job``, then the job's own task, which
inherits the context), so :func:`bind_job` there tags every line logged on the job's behalf,
by tokenbus, arq, LangGraph or the user's graph alike. :class:`JobContextFilter` copies the
context onto each record as ``job_id``, ``attempt`` and ``graph`` (a line logged with one of
them in ``extra`` keeps its own), for a formatter to show: the CLI's ``--log-format json`` does.
The filter is attached by the CLI's logging configuration, never here.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

FIELDS = ("job_id", "attempt", "graph")

_job: ContextVar[dict[str, Any] | None] = ContextVar("tokenbus_job", default=None)


def bind_job(**fields: Any) -> None:
    """Tag what the current task (and the tasks it starts) logs with ``fields`` (of :data:`FIELDS`),
    on top of what it was tagged with; None values are left out."""
    values = {**(_job.get() or {}), **{k: v for k, v in fields.items() if v is not None}}
    _job.set(values)


class JobContextFilter(logging.Filter):
    """Puts the current job's fields on each record (it never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        values = _job.get()
        if values:
            for name, value in values.items():
                if not hasattr(record, name):
                    setattr(record, name, value)
        return True
