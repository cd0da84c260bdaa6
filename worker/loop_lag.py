"""Event-loop lag: how late the worker's event loop runs what is due.

Everything a worker does — every job, the publisher, the lease renewals — runs on one event loop,
so a node that blocks it (a ``time.sleep``, CPU-bound work in an ``async`` node) stops them all:
tokens stop, leases lapse and other workers take the jobs over. :class:`LoopMonitor` wakes every
``interval_s`` and records how late each wake-up came; from another thread (the health
endpoint's), :meth:`LoopMonitor.blocked_s` tells how late the loop is right now, even while it
is stuck and records nothing.
"""

from __future__ import annotations

import asyncio
import time

from tokenbus.worker.background import Background
from tokenbus.worker.stats import SECONDS, Buckets

INTERVAL_S = 0.25


class LoopMonitor(Background):
    task_name = "tokenbus-loop-monitor"

    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.lags = Buckets(SECONDS)
        """The lag of every wake-up, in seconds."""
        self.last_lag = 0.0
        self._last_tick = time.monotonic()

    async def _loop(self) -> None:
        self._last_tick = time.monotonic()
        while True:
            await asyncio.sleep(self.interval_s)
            now = time.monotonic()
            lag = max(0.0, now - self._last_tick - self.interval_s)
            self._last_tick = now
            self.last_lag = lag
            self.lags.observe(lag)

    def blocked_s(self) -> float:
        """How late the event loop is now: the lag of its last wake-up or, if the next one is
        overdue (the loop is stuck), by how much. Safe to call from any thread."""
        overdue = time.monotonic() - self._last_tick - self.interval_s
        return max(self.last_lag, overdue, 0.0)
