"""The reading side of the gateway benchmark, each kind in processes of its own.

    python -m bench.gateway_readers sse HOST PORT       # SSE connections to a `tokenbus serve`
    python -m bench.gateway_readers subscribe URL PREFIX  # the baseline: subscribe() readers

Both are driven by JSON lines on stdin and answer with JSON lines on stdout:

- ``{"open": [path, ...]}`` (sse) or ``{"open": [job, ...]}`` (subscribe, one reader per item:
  a job listed N times gets N readers) → ``{"opened": n}`` once every connection or reader has
  received its first event (a job's ``start`` entry; a tag stream's opening comment).
- ``{"mark": true}`` → ``{"marked": true}``: CPU time is counted from here.
- ``{"beats": k}`` → ``{"beats": k}`` once every SSE connection has received k heartbeats.
- ``{"wait_end": true}`` → ``{"ended": n}`` once every connection or reader has seen its job end.
- ``{"stop": true}`` → the result, then the process exits: tokens received, a histogram of their
  latency (written → received, one clock: the token's ``data.t`` against ``time.time_ns()``),
  the first and last receipt times, and the process's CPU seconds since its start-up.

The SSE reader is an ``asyncio.Protocol`` that never parses an event: it looks for a few byte
markers (a token's ``"t":``, ``event: end``, a heartbeat's ``: ping``) in what a read returns, so
that one process can keep up with a gateway process at its limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import uvloop
from redis.asyncio import Redis

from tokenbus.consumer.subscribe import subscribe
from tokenbus.schemas.entries import Entry

T_MARKER = b',"t":'
"""Where a token's write time starts in its ``data`` (``{"id": ..., "t": <ns>}``, see bench.gateway)."""
END_MARKERS = (b"event: end", b"event: error", b"event: cancelled", b"event: overflow", b"event: gateway_error")
"""Events after which a connection's response ends (the bench's jobs never retry)."""
FINE_US = 100_000
"""Latencies below this are kept to 10 µs, above it to 1 ms."""


def bucket(latency_ns: int) -> int:
    us = latency_ns // 1000
    return us // 10 if us < FINE_US else FINE_US // 10 + (us - FINE_US) // 1000


def bucket_us(key: int) -> float:
    """The latency a histogram key stands for (the middle of its bucket), in µs."""
    return key * 10 + 5 if key < FINE_US // 10 else FINE_US + (key - FINE_US // 10) * 1000 + 500


class Tally:
    """What one process received: token count, latency histogram, first and last receipt."""

    def __init__(self) -> None:
        self.tokens = 0
        self.histogram: Counter[int] = Counter()
        self.first_ns = 0
        self.last_ns = 0

    def token(self, now_ns: int, written_ns: int) -> None:
        self.tokens += 1
        self.histogram[bucket(now_ns - written_ns)] += 1
        if not self.first_ns:
            self.first_ns = now_ns
        self.last_ns = now_ns

    def result(self, cpu0: float, **extra: Any) -> dict[str, Any]:
        return {
            "tokens": self.tokens, "histogram": dict(self.histogram), "first_ns": self.first_ns,
            "last_ns": self.last_ns, "cpu_s": cpu_seconds() - cpu0, **extra,
        }  # fmt: skip


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- SSE connections -----------------------------------------------------------------------------


class SSEConnection(asyncio.Protocol):
    """One ``GET`` of an SSE path, counted by markers: never parsed."""

    def __init__(self, request: bytes, readers: Readers) -> None:
        self._request = request
        self._readers = readers
        self._tail = b""
        self._head = True
        self.opened = False
        self.ended = False
        self.status = b""
        self.beats = 0
        self.overflows = 0
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        if self._head:
            self._head = False
            self.status = data[9:12]
            if self.status != b"200":
                self._end()
                return
        buf = self._tail + data if self._tail else data
        cut = buf.rfind(b"\r\n\r\n")  # whole events only: a marker is never cut in two
        if cut < 0:
            self._tail = buf
            return
        cut += 4
        chunk, self._tail = buf[:cut], buf[cut:]
        tally = self._readers.tally
        i = chunk.find(T_MARKER)
        while i >= 0:
            j = chunk.find(b"}", i)
            tally.token(now, int(chunk[i + 5 : j]))
            i = chunk.find(T_MARKER, j)
        if not self.opened and (b"event: start" in chunk or b": tokenbus" in chunk):
            self.opened = True
            self._readers.changed()
        if b": ping" in chunk:
            goal, before = self._readers.beat_goal, self.beats
            self.beats += chunk.count(b": ping")
            if before < goal <= self.beats:
                self._readers.reached += 1
                self._readers.changed()
        if b"event: overflow" in chunk:
            self.overflows += 1
        if any(marker in chunk for marker in END_MARKERS):
            self._end()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            readers = self._readers
            readers.ended += 1
            if self.beats < readers.beat_goal:
                readers.reached += 1  # lost: it will not reach the goal
            readers.changed()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()


class Readers:
    """The connections (or subscribe() readers) of one process, and the conditions awaited on them."""

    def __init__(self) -> None:
        self.tally = Tally()
        self.opened = 0
        self.ended = 0
        self.beat_goal = 0
        self.reached = 0
        """Connections with ``beat_goal`` heartbeats, or ended."""
        self._changed = asyncio.Event()

    def changed(self) -> None:
        self._changed.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._changed.clear()
            await self._changed.wait()


async def run_sse(host: str, port: int) -> None:
    readers = Readers()
    connections: list[SSEConnection] = []
    loop = asyncio.get_running_loop()
    cpu0 = cpu_seconds()
    opening = asyncio.Semaphore(64)  # a burst of 2,000 SYNs at once overflows the listen backlog

    async def connect(path: str) -> SSEConnection:
        request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode()
        connection = SSEConnection(request, readers)
        connections.append(connection)
        async with opening:
            await loop.create_connection(lambda: connection, host, port)
            await readers.until(lambda: connection.opened or connection.ended)
        return connection

    async for command in commands():
        if "mark" in command:
            cpu0 = cpu_seconds()
            reply({"marked": True})
        elif "open" in command:
            batch = await asyncio.gather(*(connect(path) for path in command["open"]))
            reply({"opened": sum(c.opened for c in batch), "refused": sum(not c.opened for c in batch)})
        elif "beats" in command:
            readers.beat_goal = goal = command["beats"]
            readers.reached = sum(c.beats >= goal or c.ended for c in connections)
            await readers.until(lambda: readers.reached >= len(connections))
            reply({"beats": goal, "lost": readers.ended})
        elif "wait_end" in command:
            await readers.until(lambda: readers.ended >= len(connections))
            reply({"ended": readers.ended})
        elif "stop" in command:
            for c in connections:
                if c.transport is not None:
                    c.transport.close()
            statuses = Counter(c.status.decode() for c in connections)
            beats = sum(c.beats for c in connections)
            extra = {"ended": readers.ended, "overflows": sum(c.overflows for c in connections), "beats": beats}
            reply(readers.tally.result(cpu0, connections=len(connections), statuses=dict(statuses), **extra))
            return


# -- the baseline: subscribe() -------------------------------------------------------------------


async def run_subscribe(url: str, prefix: str) -> None:
    readers = Readers()
    redis = Redis.from_url(url, socket_timeout=None, max_connections=None)
    tasks: list[asyncio.Task[None]] = []
    cpu0 = cpu_seconds()

    async def read(job: str) -> None:
        tally = readers.tally
        first = True
        try:
            async for item in subscribe(redis, jobs=[job], prefix=prefix, start="0"):
                now = time.time_ns()
                if first:
                    first = False
                    readers.opened += 1
                    readers.changed()
                if isinstance(item, Entry) and item.is_chunk:
                    tally.token(now, item.data["t"])
        finally:
            readers.ended += 1
            readers.changed()

    try:
        async for command in commands():
            if "mark" in command:
                cpu0 = cpu_seconds()
                reply({"marked": True})
            elif "open" in command:
                tasks.extend(asyncio.create_task(read(job)) for job in command["open"])
                await readers.until(lambda: readers.opened + readers.ended >= len(tasks))
                reply({"opened": readers.opened})
            elif "wait_end" in command:
                await readers.until(lambda: readers.ended >= len(tasks))
                reply({"ended": readers.ended})
            elif "stop" in command:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                reply(readers.tally.result(cpu0, connections=len(tasks), ended=readers.ended))
                return
    finally:
        await redis.aclose()


# -- the driver's protocol -----------------------------------------------------------------------


async def commands() -> Any:
    """The JSON commands written to this process's stdin, one per line."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        yield orjson.loads(line)


def reply(message: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(message, option=orjson.OPT_NON_STR_KEYS) + b"\n")
    sys.stdout.flush()


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of sockets
    kind, *args = sys.argv[1:]
    with contextlib.suppress(KeyboardInterrupt):
        if kind == "sse":
            uvloop.run(run_sse(args[0], int(args[1])))
        elif kind == "subscribe":
            uvloop.run(run_subscribe(args[0], args[1]))
        else:
            sys.exit(f"unknown reader kind {kind!r}: sse or subscribe")


if __name__ == "__main__":
    main()
