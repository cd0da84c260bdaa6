"""The publisher on a Redis Cluster of fake nodes: what one node acknowledged stays written, and
counts as written, whatever the others do and however many calls a batch takes; only the copies
no node acknowledged are counted lost when the publisher gives up. With ``WAIT``, each node's
pipeline ends with one, and judges the commands that pipeline wrote: those redirected by ``ASK``
by the importing node's."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection
from types import SimpleNamespace
from typing import Any

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import RedisCluster

from tests.unit.fake_wire import FakeWire
from tokenbus.schemas.errors import PublishError
from tokenbus.worker import cluster_wire as cluster_wire_module
from tokenbus.worker import publisher as publisher_module
from tokenbus.worker.publisher import Publisher
from tokenbus.worker.wire import slot_of

A, B = "10.0.0.1:7000", "10.0.0.2:7000"
KEY_A, KEY_B = "ka", "kb"  # two keys, two slots: one on each node
CHUNKS = 5


class Clock:
    """The publisher's clock (how long it has been failing), moved on by the test's fakes only."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


class FakeTopology:
    """The slot table of two fake nodes, ``A`` and ``B``, each with a :class:`FakeWire`. Each call
    of the publisher starts with :meth:`ready`, which moves the clock on by one second; from the
    ``readable``-th call on, the table cannot be read (as when the node redis-py asks for it is
    dead)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.wires = {A: FakeWire(), B: FakeWire()}
        self.slots = {slot_of(KEY_A): A, slot_of(KEY_B): B}
        self.calls = 0
        self.readable: int | None = None
        self.refreshed: list[set[str]] = []

    async def ready(self) -> None:
        self.calls += 1
        self.clock.now += 1.0
        if self.readable is not None and self.calls >= self.readable:
            raise redis_errors.ConnectionError("Error 111 connecting to the node asked for the slot table")

    def node_of(self, slot: int) -> str:
        return self.slots[slot]

    def primaries(self) -> set[str]:
        return set(self.wires)

    def connection(self, name: str) -> FakeWire:
        return self.wires[name]

    async def refresh(self, failed: Collection[str] = ()) -> None:
        self.refreshed.append(set(failed))
        if self.readable is not None:
            raise redis_errors.ConnectionError("Error 111 connecting to the node asked for the slot table")


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(publisher_module, "time", SimpleNamespace(monotonic=clock.monotonic))
    return clock


@pytest.fixture
def topology(monkeypatch: pytest.MonkeyPatch, clock: Clock) -> FakeTopology:
    """The cluster every publisher built in this test writes to: the cluster wire's topology,
    whose connection to a node is that node's fake wire."""
    fake = FakeTopology(clock)
    monkeypatch.setattr(cluster_wire_module, "ClusterTopology", lambda cluster: fake)
    monkeypatch.setattr(cluster_wire_module, "Wire", lambda *, timeout_s, connection: connection())
    return fake


StartPublisher = Callable[..., Publisher]


@pytest.fixture
async def start_publisher(topology: FakeTopology) -> AsyncIterator[StartPublisher]:
    started: list[Publisher] = []

    def start(**options: Any) -> Publisher:
        client = RedisCluster(host="127.0.0.1", port=7000)  # never connected: the fakes answer
        publisher = Publisher(client, backoff_s=(0.0,), **options).start()
        started.append(publisher)
        return publisher

    yield start
    for wire in topology.wires.values():
        wire.failures.clear()
        wire.gate.set()
    for publisher in started:
        await publisher.close()


def values(wire: FakeWire) -> list[bytes]:
    return [command[-1] for command in wire.commands]


def xadds(wire: FakeWire) -> list[bytes]:
    """The last field of each ``XADD`` the node took, in order."""
    return [command[-1] for command in wire.commands if command[0] == b"XADD"]


class Fence:
    """The publisher's fence, with ``count`` attempts fenced (no lease ever in doubt)."""

    count = 0

    def expired(self) -> bool:
        return False

    async def confirm(self) -> None:
        raise AssertionError("no lease is in doubt")

    def fenced(self) -> int:
        return self.count


@pytest.mark.parametrize(
    ("calls", "readable"),
    [(1, None), (3, None), (3, 2)],
    ids=["given-up-in-the-same-call", "node-failing-every-call", "slot-table-unreadable-after-the-first-call"],
)
async def test_past_give_up_only_the_copies_of_the_failed_node_are_lost(
    start_publisher: StartPublisher, topology: FakeTopology, calls: int, readable: int | None
) -> None:
    """A batch of chunks, each copied to a stream on A and one on B. A acknowledges its copies in
    the first call (one refused); B fails every call, or the slot table cannot be read from the
    second call on, until the publisher gives up (after ``calls`` calls, one second of the
    clock each): B's copies are lost, A's are written, once."""
    topology.readable = readable
    publisher = start_publisher(give_up_s=calls - 0.5)
    topology.wires[B].failures = [redis_errors.ConnectionError("Connection reset by peer")] * calls
    topology.wires[A].refuse = lambda command: "WRONGTYPE not a stream" if command[-1] == b"0" else None
    sink = publisher.sink("j")
    for i in range(CHUNKS):
        publisher.xadd(sink, [(KEY_A, 100), (KEY_B, 100)], ["n", str(i)])
    await sink.flushed()

    assert topology.calls == calls
    assert topology.wires[A].batches and len(topology.wires[A].batches) == 1  # not sent again
    assert values(topology.wires[A]) == [str(i).encode() for i in range(CHUNKS)]
    assert topology.wires[B].commands == []
    assert sink.lost == CHUNKS  # B's copies, nothing of A's
    assert (sink.refused, sink.refusal) == (1, "XADD ka: WRONGTYPE not a stream")  # refused in the first call, not lost
    assert (publisher.lost_total, publisher.entries_lost, publisher.entries_written) == (CHUNKS, CHUNKS + 1, CHUNKS - 1)
    assert publisher.failures == calls and publisher.retries == calls - 1
    assert sink.failure().lost == CHUNKS + 1


async def test_a_node_failing_then_recovering_gets_only_its_part_again(
    start_publisher: StartPublisher, topology: FakeTopology
) -> None:
    publisher = start_publisher()
    topology.wires[B].failures = [redis_errors.ConnectionError("Connection reset by peer")] * 2
    sink = publisher.sink("j")
    for i in range(CHUNKS):
        publisher.xadd(sink, [(KEY_A, 100), (KEY_B, 100)], ["n", str(i)])
    await sink.flushed()

    expected = [str(i).encode() for i in range(CHUNKS)]
    assert (values(topology.wires[A]), values(topology.wires[B])) == (expected, expected)
    assert len(topology.wires[A].batches) == 1 and topology.calls == 3
    assert topology.refreshed == [{B}, {B}]  # the slot table reloaded, the failed node asked last
    assert (sink.lost, publisher.entries_written, publisher.retries) == (0, 2 * CHUNKS, 2)
    sink.check()


async def test_an_attempt_fenced_between_two_calls_is_dropped_and_what_was_written_stays(
    start_publisher: StartPublisher, topology: FakeTopology
) -> None:
    """Two jobs' chunks, copied to A and B; A takes its copies (one of the second job's refused)
    while B holds its pipeline, then fails it. Before the next call the first job's attempt loses
    its lease: B then gets the second job's copies only, and the refusal on A stays the second
    job's (the batch renumbered without the first job's commands)."""
    publisher = start_publisher()
    fence = publisher.fence = Fence()
    gone, kept = publisher.sink("gone"), publisher.sink("kept")
    a, b = topology.wires[A], topology.wires[B]
    a.refuse = lambda command: "WRONGTYPE not a stream" if command[-1] == b"kept 1" else None
    b.gate.clear()
    for i in range(CHUNKS):
        publisher.xadd(gone, [(KEY_A, 100), (KEY_B, 100)], ["n", f"gone {i}"])
    for i in range(CHUNKS):
        publisher.xadd(kept, [(KEY_A, 100), (KEY_B, 100)], ["n", f"kept {i}"])
    await b.in_flight.wait()
    gone.fenced, fence.count = True, 1
    b.failures = [redis_errors.ConnectionError("Connection reset by peer")]
    b.gate.set()
    await gone.flushed()
    await kept.flushed()

    assert values(a) == [f"{job} {i}".encode() for job in ("gone", "kept") for i in range(CHUNKS)]
    assert values(b) == [f"kept {i}".encode() for i in range(CHUNKS)]
    assert len(a.batches) == 1 and len(b.batches) == 1
    assert (gone.lost, gone.refused, kept.lost) == (0, 0, 0)
    assert (kept.refused, kept.refusal) == (1, "XADD ka: WRONGTYPE not a stream")
    assert publisher.entries_written == 2 * CHUNKS - 1 + CHUNKS  # A's, but the refused one, and B's


async def test_with_wait_each_nodes_pipeline_ends_with_wait_and_judges_its_own_commands(
    start_publisher: StartPublisher, topology: FakeTopology
) -> None:
    """A's replica acknowledges, B's does not: the chunks' copies on B are unacknowledged (but the
    one B refused: refused, not unacknowledged), those on A written; an ``EXPIRE`` is no entry."""
    publisher = start_publisher(wait_replicas=1, wait_timeout_ms=50)
    a, b = topology.wires[A], topology.wires[B]
    a.replicas, b.replicas = 1, 0
    b.refuse = lambda command: "OOM no memory" if command[-1] == b"0" else None
    sink = publisher.sink("j")
    for i in range(CHUNKS):
        publisher.xadd(sink, [(KEY_A, 100), (KEY_B, 100)], ["n", str(i)])
    publisher.command(sink, ("EXPIRE", KEY_B, 60))
    await sink.flushed()

    for wire in (a, b):
        assert wire.batches and all(batch[-1] == [b"WAIT", b"1", b"50"] for batch in wire.batches)
        assert xadds(wire) == [str(i).encode() for i in range(CHUNKS)]
    assert (sink.unacked, sink.lost, sink.refused, sink.refusal) == (CHUNKS - 1, 0, 1, "XADD kb: OOM no memory")
    counted = (publisher.entries_written, publisher.entries_unacknowledged, publisher.entries_lost)
    assert counted == (CHUNKS, CHUNKS - 1, 1)
    with pytest.raises(PublishError, match=f"{CHUNKS - 1} stream entries of job j were written but not acknowledged"):
        sink.check()


@pytest.mark.parametrize("short", [A, B], ids=["source-short", "importing-node-short"])
async def test_commands_redirected_by_ask_are_judged_by_the_wait_of_the_importing_nodes_pipeline(
    start_publisher: StartPublisher, topology: FakeTopology, short: str
) -> None:
    """A's slot is migrating to B: A answers ``ASK`` for two of the chunks, which B writes after
    ``ASKING``, in a pipeline ending with its own ``WAIT``. The node whose replica does not
    acknowledge (``short``) leaves unacknowledged exactly the chunks it wrote."""
    publisher = start_publisher(wait_replicas=1, wait_timeout_ms=50)
    a, b = topology.wires[A], topology.wires[B]
    a.replicas, b.replicas = (0, 1) if short == A else (1, 0)
    asked = {b"1", b"3"}
    a.refuse = lambda command: f"ASK {slot_of(KEY_A)} {B}" if command[-1] in asked else None
    sink = publisher.sink("j")
    for i in range(CHUNKS):
        publisher.xadd(sink, [(KEY_A, 100)], ["n", str(i)])
    await sink.flushed()

    assert [[c[0] for c in batch] for batch in b.batches] == [[b"ASKING", b"XADD", b"ASKING", b"XADD", b"WAIT"]]
    assert sorted(xadds(b)) == sorted(asked) and a.batches[-1][-1][0] == b"WAIT"
    on_short = len(asked) if short == B else CHUNKS - len(asked)
    assert (sink.unacked, publisher.entries_unacknowledged) == (on_short, on_short)
    assert (publisher.entries_written, publisher.redirects, sink.lost) == (CHUNKS - on_short, len(asked), 0)


async def test_given_up_the_copies_a_node_wrote_short_of_replicas_stay_unacknowledged_not_lost(
    start_publisher: StartPublisher, topology: FakeTopology
) -> None:
    """A writes its copies (its replica does not acknowledge) while B fails until the publisher
    gives up: A's copies are unacknowledged, B's lost, none written."""
    publisher = start_publisher(give_up_s=0.5, wait_replicas=1)
    topology.wires[B].failures = [redis_errors.ConnectionError("Connection reset by peer")]
    sink = publisher.sink("j")
    for i in range(CHUNKS):
        publisher.xadd(sink, [(KEY_A, 100), (KEY_B, 100)], ["n", str(i)])
    await sink.flushed()

    assert (sink.unacked, sink.lost, publisher.entries_written) == (CHUNKS, CHUNKS, 0)
    assert (publisher.entries_unacknowledged, publisher.entries_lost) == (CHUNKS, CHUNKS)


async def test_an_attempt_fenced_between_two_calls_keeps_its_unacknowledged_copies_counted(
    start_publisher: StartPublisher, topology: FakeTopology
) -> None:
    """The first job's chunks go to A, the second's are copied to A and B. A writes its copies
    short of replicas while B holds its pipeline, then fails it; the first job's attempt is
    fenced before the next call. Each job keeps its copies on A unacknowledged (the batch
    renumbered without the first job's commands), and B, whose replica acknowledges, writes the
    second job's."""
    publisher = start_publisher(wait_replicas=1)
    fence = publisher.fence = Fence()
    gone, kept = publisher.sink("gone"), publisher.sink("kept")
    a, b = topology.wires[A], topology.wires[B]
    b.replicas = 1
    b.gate.clear()
    for i in range(CHUNKS):
        publisher.xadd(gone, [(KEY_A, 100)], ["n", f"gone {i}"])
    for i in range(CHUNKS):
        publisher.xadd(kept, [(KEY_A, 100), (KEY_B, 100)], ["n", f"kept {i}"])
    await b.in_flight.wait()
    gone.fenced, fence.count = True, 1
    b.failures = [redis_errors.ConnectionError("Connection reset by peer")]
    b.gate.set()
    await gone.flushed()
    await kept.flushed()

    assert xadds(b) == [f"kept {i}".encode() for i in range(CHUNKS)] and len(a.batches) == 1
    assert (gone.unacked, kept.unacked, gone.lost, kept.lost) == (CHUNKS, CHUNKS, 0, 0)
    assert (publisher.entries_unacknowledged, publisher.entries_written) == (2 * CHUNKS, CHUNKS)
