"""The publisher on a Redis Cluster of fake nodes: what one node acknowledged stays written, and
counts as written, whatever the others do and however many calls a batch takes; only the copies
no node acknowledged are counted lost when the publisher gives up."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection
from types import SimpleNamespace
from typing import Any

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import RedisCluster

from tests.unit.fake_wire import FakeWire
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

    class Fence:
        count = 0

        def expired(self) -> bool:
            return False

        async def confirm(self) -> None:
            raise AssertionError("no lease is in doubt")

        def fenced(self) -> int:
            return self.count

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
