"""What a worker counts about its jobs, in plain ints, for :mod:`tokenbus.worker.metrics` to read.

Counting happens on the event loop's thread, on paths that run per job, per batch or per token;
the metrics endpoint reads the counts from its own thread when it is scraped. So nothing here
calls prometheus-client: an ``int += 1`` costs a few nanoseconds, a ``Counter.inc()`` (a lock,
a label lookup) a microsecond or more, which per token would be a sizeable share of what a
token costs the worker. Reads from another thread see each int whole (the GIL); the few
structures that change shape (the running jobs, the per-graph tables) are copied under a lock
that is taken once per job, never per token.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenbus.worker.emitter import JobEmitter

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Bucket bounds of short durations: a publish round trip, event-loop lag."""
JOB_SECONDS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
"""Bucket bounds of a job's duration and of its time to first token (which a model's queue can make long)."""
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Bucket bounds of a publish batch's size, in commands (``TOKENBUS_PUBLISH_BATCH`` is 4096 by default)."""

UNKNOWN_GRAPH = "unknown"
"""The graph label of a job whose request names no served graph (a bad request)."""


class Buckets:
    """A histogram in plain ints: ``counts[i]`` observations at most ``bounds[i]`` (and above the
    last bound, ``counts[-1]``), not cumulative; the collector makes them so."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> tuple[list[tuple[str, int]], float]:
        """``(le, count)`` pairs ending with ``+Inf``, and the sum: what a Prometheus histogram shows."""
        counts, total = list(self.counts), self.total  # one copy, so the buckets agree with each other
        running, out = 0, []
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else f"{bound:g}", running))
        return out, total


class JobStats:
    """Jobs started and finished per graph, their durations and times to first chunk, and the
    chunks they published (read from the running jobs' emitters, which count them anyway)."""

    def __init__(self, graphs: Sequence[str]) -> None:
        self.graphs = frozenset(graphs)
        self._lock = threading.Lock()
        self.started: dict[str, int] = {}
        self.finished: dict[tuple[str, str], int] = {}
        self.duration: dict[str, Buckets] = {}
        self.first_chunk: dict[str, Buckets] = {}
        self._chunks: dict[tuple[str, str], int] = {}  # (graph, token|custom) of the jobs that ended
        self._running: dict[JobEmitter, str] = {}

    def graph_label(self, graph: str | None) -> str:
        """The label of a job's graph: its name if this worker serves it (a bounded set of values)."""
        return graph if graph is not None and graph in self.graphs else UNKNOWN_GRAPH

    def job_started(self, graph: str, emitter: JobEmitter) -> None:
        started = time.monotonic()
        first_chunk = self._buckets(self.first_chunk, graph, JOB_SECONDS)

        def on_first_chunk() -> None:
            first_chunk.observe(time.monotonic() - started)

        emitter.on_first_chunk = on_first_chunk
        with self._lock:
            self.started[graph] = self.started.get(graph, 0) + 1
            self._running[emitter] = graph

    def job_finished(self, emitter: JobEmitter, status: str, seconds: float) -> None:
        with self._lock:
            graph = self._running.pop(emitter, None)
            if graph is None:
                return
            for kind, count in (("token", emitter.tokens), ("custom", emitter.payloads)):
                self._chunks[(graph, kind)] = self._chunks.get((graph, kind), 0) + count
            self.finished[(graph, status)] = self.finished.get((graph, status), 0) + 1
        self._buckets(self.duration, graph, JOB_SECONDS).observe(seconds)

    def _buckets(self, table: dict[str, Buckets], graph: str, bounds: Sequence[float]) -> Buckets:
        buckets = table.get(graph)
        if buckets is None:
            with self._lock:
                buckets = table.setdefault(graph, Buckets(bounds))
        return buckets

    @property
    def running(self) -> int:
        return len(self._running)

    def snapshot(self) -> JobCounts:
        """A consistent copy of the counts: a job that ends meanwhile is counted once, not twice."""
        with self._lock:
            chunks = dict(self._chunks)
            for emitter, graph in self._running.items():
                for kind, count in (("token", emitter.tokens), ("custom", emitter.payloads)):
                    chunks[(graph, kind)] = chunks.get((graph, kind), 0) + count
            return JobCounts(
                started=dict(self.started),
                finished=dict(self.finished),
                chunks=chunks,
                duration=dict(self.duration),
                first_chunk=dict(self.first_chunk),
            )


class JobCounts:
    """A copy of :class:`JobStats`'s tables, taken at one moment."""

    __slots__ = ("chunks", "duration", "finished", "first_chunk", "started")

    def __init__(
        self,
        *,
        started: dict[str, int],
        finished: dict[tuple[str, str], int],
        chunks: dict[tuple[str, str], int],
        duration: dict[str, Buckets],
        first_chunk: dict[str, Buckets],
    ) -> None:
        self.started, self.finished, self.chunks = started, finished, chunks
        self.duration, self.first_chunk = duration, first_chunk
