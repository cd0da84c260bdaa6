"""A pipelined connection for the publisher: packed by hiredis, replies parsed by hiredis in bulk.

redis-py's pipeline packs every argument in Python and reads replies one at a time, each under
its own timeout context: work paid on every token, which the publisher cannot afford. The publisher's
commands are simple (XADD, EXPIRE, ZADD, ZREM with str/bytes/int/float arguments), so here they
are packed with ``hiredis.pack_command``, and the replies of a batch are counted by hiredis as
they arrive, in the transport's callback (:class:`_Replies`). The connection itself (TLS, AUTH/ACL
user, database) is redis-py's, made from the client's pool settings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

from tokenbus.consumer.resp import pack
from tokenbus.worker._redis import transport_of


def describe(packed: bytes, index: int) -> str:
    """The command name and key of the ``index``-th command in ``packed`` (e.g. ``XADD key``)."""
    reader = hiredis.Reader()
    reader.feed(packed)
    for _ in range(index):
        reader.gets()
    args = reader.gets()
    return b" ".join(args[:2]).decode(errors="replace") if isinstance(args, list) else "?"


def pack_args(args: Sequence[Any]) -> bytes:
    """Arguments in the Redis protocol, without the ``*<count>`` header: to be concatenated."""
    packed = pack(tuple(args))
    return packed[packed.index(b"\r\n") + 2 :]


def slot_of(key: str | bytes) -> int:
    """The Redis Cluster hash slot of ``key`` (its ``{hash tag}``'s, if it has one)."""
    return key_slot(key.encode() if isinstance(key, str) else key)


class Route:
    """Where the commands packed back to back in one queued item go on a Redis Cluster: the hash
    slot of each command's key, and where each command ends.

    The commands of an item share one part of variable length (a chunk's values, or nothing) and
    differ by a part of fixed length each (``fixed``): command ``i`` is ``fixed[i] + v`` bytes,
    where ``v`` follows from the item's length. So an item is cut into its commands by slicing,
    without parsing, and only on a cluster.

    A merged chunk (:meth:`ChunkTemplate.pack_merged`) is cut by its template's route too: what
    merging adds to each command (a longer ``*<count>``, the ``n`` field, more text) is the same in
    every command, so it is part of ``v`` (``tests/test_wire.py`` checks the cut, exactly).
    """

    __slots__ = ("_fixed", "_total", "slots")

    def __init__(self, keys: Sequence[str | bytes], fixed: Sequence[int]) -> None:
        if len(keys) != len(fixed) or not keys:
            raise ValueError("a route names the key and the fixed length of each command, at least one")
        self.slots = tuple(slot_of(key) for key in keys)
        self._fixed = tuple(fixed)
        self._total = sum(self._fixed)

    @classmethod
    def of(cls, keys: Sequence[str | bytes], commands: Sequence[bytes]) -> Route:
        """The route of ``commands`` (one per key), to be joined into one item."""
        return cls(keys, [len(command) for command in commands])

    def split(self, packed: bytes) -> list[tuple[int, bytes]]:
        """``(slot, command)`` of each command in ``packed``."""
        slots = self.slots
        if len(slots) == 1:
            return [(slots[0], packed)]
        shared, rest = divmod(len(packed) - self._total, len(slots))
        if rest or shared < 0:
            raise ValueError(f"{len(packed)} bytes are not the {len(slots)} commands of this route")
        out, start = [], 0
        for slot, fixed in zip(slots, self._fixed, strict=True):
            end = start + fixed + shared
            out.append((slot, packed[start:end]))
            start = end
        return out


class Hole:
    """A placeholder in the fields of a :class:`ChunkTemplate`, filled in for each entry."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Hole({self.name!r})"


SEQ, CONTENT, DATA, TS = Hole("seq"), Hole("content"), Hole("data"), Hole("ts")
CHUNK_HOLES = (SEQ, CONTENT, DATA, TS)
"""What varies between the chunk entries of one model call, in the order they appear in the fields."""


_SHORT = 4096
_BULK_HEADERS = tuple(b"$%d\r\n" % n for n in range(_SHORT))
"""``$<length>\r\n`` of the bulk strings shorter than ``_SHORT`` (every ``seq`` and ``ts``, most tokens)."""


class ChunkTemplate:
    """``XADD`` commands for the chunks of one model call, to each of its streams.

    The chunks of a call share every field but ``seq``, ``content``, ``data`` and ``ts``, and every
    stream gets the same fields, so a chunk's commands are the chunk's part (its four values and the
    constant runs of fields between them), packed once and joined by what differs from stream to
    stream: before it ``XADD key MAXLEN ~ n *`` and the fields up to ``seq``, after it the fields
    after ``ts``. Two joins per chunk cost less than one ``%`` format over the whole commands
    (BENCHMARKS.md).
    """

    __slots__ = ("_between", "_edges", "_heads", "_merged_heads", "_tail", "commands", "fixed", "route")

    def __init__(self, prefixes: list[bytes], fields: Sequence[Any]) -> None:
        header = b"*%d\r\n" % (len(fields) + 6)
        self.commands = len(prefixes)
        """How many commands :meth:`pack` packs (one per stream)."""
        runs: list[bytes] = []
        holes: list[Hole] = []
        start = 0
        for i, value in enumerate(fields):
            if isinstance(value, Hole):
                runs.append(pack_args(fields[start:i]) if i > start else b"")
                holes.append(value)
                start = i + 1
        runs.append(pack_args(fields[start:]) if start < len(fields) else b"")
        if holes != list(CHUNK_HOLES):
            raise ValueError(f"chunk fields must hold the holes {list(CHUNK_HOLES)} in that order, not {holes}")
        # a hole holds "$<length>\r\n<value>": the "\r\n" that ends it starts the run after it
        first, *between, last = runs
        self._between = tuple(b"\r\n" + run for run in between)
        heads = [header + prefix + first for prefix in prefixes]
        tail = b"\r\n" + last
        self._edges = [heads[0], *(tail + head for head in heads[1:]), tail]
        self._heads, self._tail = (len(fields) + 6, prefixes, first), tail
        self._merged_heads: list[bytes] | None = None
        self.fixed = tuple(len(head) + len(tail) for head in heads)
        """The length of each command but the chunk's part (what a :class:`Route` cuts by)."""
        self.route: Route | None = None
        """Where its commands go, on a Redis Cluster (set by the publisher): those of :meth:`pack`
        and of :meth:`pack_merged` alike (see :class:`Route`)."""

    def pack(self, seq: int, content: str, data: bytes, ts: int) -> bytes:
        """The commands of one chunk, one per stream, back to back."""
        s, c, t = b"%d" % seq, content.encode(), b"%d" % ts
        after_seq, after_content, after_data = self._between
        headers, c_len, d_len = _BULK_HEADERS, len(c), len(data)
        chunk = b"".join((
            headers[len(s)], s, after_seq,
            headers[c_len] if c_len < _SHORT else b"$%d\r\n" % c_len, c, after_content,
            headers[d_len] if d_len < _SHORT else b"$%d\r\n" % d_len, data, after_data,
            headers[len(t)], t,
        ))  # fmt: skip
        return chunk.join(self._edges)

    def pack_merged(self, seq: int, content: str, data: bytes, ts: int, n: int) -> bytes:
        """The commands of an entry holding ``n`` chunks (``n`` > 1): :meth:`pack`'s fields and,
        after them, ``n`` (contract: the count of a merged chunk)."""
        heads = self._merged_heads
        if heads is None:
            count, prefixes, first = self._heads
            heads = self._merged_heads = [b"*%d\r\n" % (count + 2) + prefix + first for prefix in prefixes]
        tail = self._tail + pack_args((b"n", n))
        edges = [heads[0], *(tail + head for head in heads[1:]), tail]
        s, c, t = b"%d" % seq, content.encode(), b"%d" % ts
        after_seq, after_content, after_data = self._between
        chunk = b"".join((
            b"$%d\r\n" % len(s), s, after_seq, b"$%d\r\n" % len(c), c, after_content,
            b"$%d\r\n" % len(data), data, after_data, b"$%d\r\n" % len(t), t,
        ))  # fmt: skip
        return chunk.join(edges)


class XaddPacker:
    """Packs ``XADD key MAXLEN ~ n * fields...`` for several streams with the fields packed once.

    Commands are packed when queued, so the publisher's buffer holds one bytes object per command
    (which the garbage collector does not track) instead of a tuple of ~30 objects.
    """

    def __init__(self, max_prefixes: int = 10_000) -> None:
        self._prefixes: dict[tuple[str, int], bytes] = {}
        self._max_prefixes = max_prefixes

    def pack(self, streams: Sequence[tuple[str, int]], fields: Sequence[Any]) -> list[bytes]:
        body = pack_args(fields)
        header = b"*%d\r\n" % (len(fields) + 6)
        return [header + self._prefix(key, maxlen) + body for key, maxlen in streams]

    def template(self, streams: Sequence[tuple[str, int]], fields: Sequence[Any]) -> ChunkTemplate:
        """A :class:`ChunkTemplate` of ``fields`` (holding the :data:`CHUNK_HOLES`) to each of ``streams``."""
        return ChunkTemplate([self._prefix(key, maxlen) for key, maxlen in streams], fields)

    def _prefix(self, key: str, maxlen: int) -> bytes:
        prefix = self._prefixes.get((key, maxlen))
        if prefix is None:
            prefix = pack_args(("XADD", key, "MAXLEN", "~", maxlen, "*"))
            if len(self._prefixes) >= self._max_prefixes:
                self._prefixes.clear()
            self._prefixes[(key, maxlen)] = prefix
        return prefix


class _Replies(asyncio.Protocol):
    """The protocol of the wire's connection once redis-py has opened it: counts the replies of
    the batch in flight as the transport delivers them, parsed by hiredis in the transport's
    callback, and wakes the writer once, when the last one is in.

    Redis answers a large batch in many small packets (one per 16 KB of commands it reads); read
    through redis-py's stream reader, each packet would wake the writer task, dozens of times per
    batch (BENCHMARKS.md). Whatever else the transport reports goes on to redis-py's own
    protocol, which closes the connection as usual.
    """

    def __init__(self, inner: asyncio.BaseProtocol) -> None:
        self._inner = inner
        self._reader = hiredis.Reader()
        self._left = 0
        self._index = 0
        self._errors: list[tuple[int, redis_errors.ResponseError]] = []
        self._waiter: asyncio.Future[list[tuple[int, redis_errors.ResponseError]]] | None = None
        self.lost = False
        self.last: Any = None
        """The last reply of the batch (a ``WAIT``'s count of replicas, when the batch ends with one)."""

    def expect(self, count: int) -> asyncio.Future[list[tuple[int, redis_errors.ResponseError]]]:
        """A future of the errors among the next ``count`` replies, by index (the others, XADD's
        new ids, are of no use to the publisher)."""
        self._left, self._index, self._errors = count, 0, []
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        if not count:
            waiter.set_result([])
        return waiter

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        try:
            while self._left:
                reply = reader.gets()
                if reply is False:
                    return
                if isinstance(reply, hiredis.ReplyError):
                    self._errors.append((self._index, redis_errors.ResponseError(str(reply))))
                self.last = reply
                self._index += 1
                self._left -= 1
        except hiredis.ProtocolError as e:
            self._fail(redis_errors.ConnectionError(f"unreadable reply from Redis: {e}"))
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(self._errors)

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(redis_errors.ConnectionError(f"Redis closed the connection ({exc or 'EOF'})"))
        self._inner.connection_lost(exc)  # redis-py's protocol: its writer's wait_closed() returns

    def _fail(self, error: Exception) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)


class Wire:
    """One connection, used by one writer at a time. Errors come back per command as exceptions.

    A batch that gets no complete reply within ``timeout_s`` fails with a connection error. The
    deadline is kept by one watchdog timer, re-armed only when it fires, not by a timer per
    batch: arming and cancelling one (``asyncio.timeout()``) is a large part of a small batch's
    CPU (BENCHMARKS.md).
    """

    def __init__(
        self,
        redis: Redis | None = None,
        *,
        timeout_s: float = 30.0,
        connection: Callable[[], AbstractConnection] | None = None,
    ) -> None:
        """A wire to ``redis`` (a connection made by its pool), or to what ``connection`` makes
        (a node of a Redis Cluster)."""
        if connection is None:
            if redis is None:
                raise ValueError("a wire needs a Redis client or a connection factory")
            connection = redis.connection_pool.make_connection
        assert connection is not None
        self._make_connection = connection
        self._timeout_s = timeout_s
        self._conn: AbstractConnection | None = None
        self._replies: _Replies | None = None
        self._busy_since: float | None = None  # when the batch in flight was sent
        self._watchdog: asyncio.TimerHandle | None = None
        self._timed_out = False
        self.connects = 0
        """Connections opened (the first, then one after each failure): read by the metrics endpoint."""

    @property
    def last_reply(self) -> Any:
        """The last reply of the batch :meth:`execute` returned from last."""
        return None if self._replies is None else self._replies.last

    async def execute(self, packed: bytes, count: int) -> list[tuple[int, redis_errors.ResponseError]]:
        """Send ``count`` packed commands; return the errors Redis replied with, by command index.

        A connection problem or timeout raises ``redis.exceptions.ConnectionError`` after dropping
        the connection, so the next call starts on a fresh one.
        """
        transport, replies = await self._connection()
        try:
            self._busy_since = time.monotonic()
            if self._watchdog is None:
                self._watchdog = asyncio.get_running_loop().call_later(self._timeout_s, self._check_deadline)
            errors = replies.expect(count)
            transport.write(packed)
            return await errors
        except asyncio.CancelledError:
            transport.abort()  # the replies still to come must not be counted for the next batch
            raise
        except (OSError, TimeoutError, redis_errors.ConnectionError) as e:
            cause = f"no reply within {self._timeout_s:g}s" if self._timed_out else str(e)
            await self.close()
            raise redis_errors.ConnectionError(f"publishing to Redis failed: {cause}") from e
        finally:
            self._busy_since = None
            self._timed_out = False

    @property
    def busy(self) -> bool:
        """A batch is in flight (sent, not all of its replies in)."""
        return self._busy_since is not None

    def _check_deadline(self) -> None:
        """The watchdog: cut the connection of a batch in flight for ``timeout_s`` (its reply
        then fails at once); otherwise wait again, for as long as the batch in flight has left.
        It sleeps while the wire is idle: the next batch arms it."""
        self._watchdog = None
        since = self._busy_since
        if since is None:
            return
        left = since + self._timeout_s - time.monotonic()
        if left > 0:
            self._watchdog = asyncio.get_running_loop().call_later(left, self._check_deadline)
        elif self._conn is not None and (transport := transport_of(self._conn)) is not None:
            self._timed_out = True
            transport.abort()

    async def _connection(self) -> tuple[asyncio.WriteTransport, _Replies]:
        if self._conn is None or self._replies is None or self._replies.lost or not self._conn.is_connected:
            await self.close()
            conn = self._make_connection()
            assert isinstance(conn, AbstractConnection)  # TCP, TLS or Unix socket
            await conn.connect()  # type: ignore[no-untyped-call]  # TLS, AUTH, SELECT as configured
            self.connects += 1
            transport = transport_of(conn)
            if transport is None:
                raise redis_errors.ConnectionError("connection closed")
            self._conn, self._replies = conn, _Replies(transport.get_protocol())
            transport.set_protocol(self._replies)
        transport = transport_of(self._conn)
        assert transport is not None
        return transport, self._replies

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._replies = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.disconnect()
