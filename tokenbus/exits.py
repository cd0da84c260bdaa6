"""The exit statuses of ``tokenbus`` commands, in one place (the README lists them)."""

EXIT_OK = 0
EXIT_JOB_FAILED = 1
"""A followed or asked-about job failed or was cancelled (``--follow``, ``tail --job``, ``result``,
``cancel`` of a job that had ended)."""
EXIT_USAGE = 2
"""A usage, configuration or Redis error: one line on stderr says what to do."""
EXIT_INCOMPLETE = 3
"""Entries were trimmed before they were read: what was printed is not the whole output."""
EXIT_NOT_ENDED = 4
"""The job has not ended: no live worker took it (``enqueue --follow``), or it is still queued or
running (``result``)."""
EXIT_CLOSED_PIPE = 141
"""Whoever read stdout stopped (``| head``): the exit status of a process ended by SIGPIPE."""
EXIT_INTERRUPTED = 130
