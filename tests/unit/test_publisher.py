"""The publisher's batching, ordering and error handling, on a fake connection."""

from __future__ import annotations

import pytest
from redis import exceptions as redis_errors

from tests.unit.conftest import StartPublisher
from tests.unit.fake_wire import Command, FakeWire
from tokenbus.schemas.errors import ClientStateError, PublishError
from tokenbus.worker.publisher import Publisher, Sink


def xadd(publisher: Publisher, sink: Sink, key: str, value: str) -> None:
    publisher.xadd(sink, [(key, 100)], ["n", value])


def values(commands: list[Command]) -> list[bytes]:
    return [c[-1] for c in commands]


async def held_in_flight(publisher: Publisher, wire: FakeWire) -> Sink:
    """A job's sink whose first entry, ``in flight``, is being written and held there until the
    test sets ``wire.gate``."""
    sink = publisher.sink("j")
    wire.gate.clear()
    xadd(publisher, sink, "k", "in flight")
    await wire.in_flight.wait()
    return sink


async def test_entries_are_written_in_the_order_they_were_queued(publisher: Publisher, wire: FakeWire) -> None:
    a, b = publisher.sink("a"), publisher.sink("b")
    for i in range(5):
        xadd(publisher, a, "ka", f"a{i}")
        xadd(publisher, b, "kb", f"b{i}")
    publisher.command(a, ("EXPIRE", "ka", 60))
    await a.flushed()
    await b.flushed()
    assert values(wire.commands) == [v for i in range(5) for v in (b"a%d" % i, b"b%d" % i)] + [b"60"]
    assert wire.commands[-1] == [b"EXPIRE", b"ka", b"60"]
    a.check()
    b.check()


async def test_what_is_queued_while_a_batch_is_in_flight_goes_out_as_the_next_batch(
    start_publisher: StartPublisher, wire: FakeWire
) -> None:
    publisher = start_publisher(batch_max=3)
    sink = await held_in_flight(publisher, wire)
    for i in range(7):
        xadd(publisher, sink, "k", str(i))
    wire.gate.set()
    await sink.flushed()
    assert [values(batch) for batch in wire.batches] == [
        [b"in flight"], [b"0", b"1", b"2"], [b"3", b"4", b"5"], [b"6"],
    ]  # fmt: skip


async def test_a_command_redis_refuses_fails_only_the_job_that_queued_it(publisher: Publisher, wire: FakeWire) -> None:
    wire.refuse = lambda command: "WRONGTYPE not a stream" if command[1] == b"bad" else None
    good, bad = publisher.sink("good"), publisher.sink("bad-job")
    xadd(publisher, good, "k", "1")
    xadd(publisher, bad, "bad", "2")
    xadd(publisher, good, "k", "3")
    await good.flushed()
    await bad.flushed()
    good.check()
    assert (bad.refused, bad.refusal, bad.transient) == (1, "XADD bad: WRONGTYPE not a stream", 0)
    with pytest.raises(PublishError, match="1 stream entries of job bad-job") as raised:
        bad.check()
    assert raised.value.lost == 1


async def test_refusals_are_counted_the_first_kept_and_those_that_may_pass_told_apart(
    publisher: Publisher, wire: FakeWire
) -> None:
    refusals = {b"full": "OOM command not allowed when used memory > 'maxmemory'.", b"bad": "WRONGTYPE not a stream"}
    wire.refuse = lambda command: refusals.get(command[1])
    sink = publisher.sink("job")
    for key in ("full", "bad", "full", "ok"):
        xadd(publisher, sink, key, "x")
    await sink.flushed()
    # three refused, the first named (the job's error quotes it), two of them may pass later (OOM)
    assert (sink.refused, sink.transient, sink.refusal) == (3, 2, f"XADD full: {refusals[b'full']}")


async def test_a_batch_is_retried_while_redis_is_away_and_written_once(
    start_publisher: StartPublisher, wire: FakeWire
) -> None:
    publisher = start_publisher(backoff_s=(0.0,))
    wire.failures = [redis_errors.ConnectionError("refused"), redis_errors.TimeoutError("no reply")]
    sink = publisher.sink("j")
    xadd(publisher, sink, "k", "1")
    xadd(publisher, sink, "k", "2")
    await sink.flushed()
    assert (publisher.retries, values(wire.commands), sink.lost) == (2, [b"1", b"2"], 0)
    sink.check()


async def test_past_give_up_a_batch_is_lost_and_each_job_told_how_much(
    start_publisher: StartPublisher, wire: FakeWire
) -> None:
    publisher = start_publisher(give_up_s=0.0)
    wire.failures = [redis_errors.ConnectionError("refused")]
    a, b = publisher.sink("a"), publisher.sink("b")
    wire.gate.clear()
    xadd(publisher, a, "ka", "1")
    publisher.xadd(b, [("kb", 100), ("kt", 100)], ["n", "2"])  # one chunk, two streams: two commands
    wire.gate.set()
    await a.flushed()
    await b.flushed()
    assert (a.lost, b.lost, publisher.lost_total, wire.commands) == (1, 2, 3, [])
    with pytest.raises(PublishError, match="2 stream entries of job b"):
        b.check()


async def test_producers_that_can_wait_are_held_past_buffer_max(
    start_publisher: StartPublisher, wire: FakeWire
) -> None:
    publisher = start_publisher(buffer_max=3)
    sink = await held_in_flight(publisher, wire)
    for i in range(2):
        xadd(publisher, sink, "k", str(i))
    assert not publisher.congested
    xadd(publisher, sink, "k", "2")
    assert publisher.congested
    wire.gate.set()
    await publisher.wait_writable()
    await sink.flushed()
    assert not publisher.congested and len(wire.commands) == 4


async def test_entries_of_a_fenced_attempt_are_not_written(publisher: Publisher, wire: FakeWire) -> None:
    class OneFenced:
        def expired(self) -> bool:
            return False

        async def confirm(self) -> None:
            raise AssertionError("no lease is in doubt")

        def fenced(self) -> int:
            return 1

    publisher.fence = OneFenced()
    kept, fenced = publisher.sink("kept"), publisher.sink("fenced")
    fenced.fenced = True
    xadd(publisher, kept, "k", "1")
    xadd(publisher, fenced, "k", "2")
    xadd(publisher, kept, "k", "3")
    await kept.flushed()
    await fenced.flushed()
    assert values(wire.commands) == [b"1", b"3"]


async def test_a_closed_publisher_writes_what_was_queued_and_refuses_more(publisher: Publisher, wire: FakeWire) -> None:
    sink = publisher.sink("j")
    xadd(publisher, sink, "k", "1")
    await publisher.close()
    assert values(wire.commands) == [b"1"] and wire.closed
    with pytest.raises(ClientStateError):
        xadd(publisher, sink, "k", "2")


async def test_producers_are_told_to_yield_once_per_yield_every(start_publisher: StartPublisher) -> None:
    publisher = start_publisher(yield_every=3)
    sink = publisher.sink("j")
    told = []
    for i in range(9):
        xadd(publisher, sink, "k", str(i))
        told.append(publisher.should_yield())
    assert told == [False, False, True] * 3
    await sink.flushed()


async def test_with_wait_replicas_every_batch_ends_with_wait_and_counts_as_written_once_acknowledged(
    start_publisher: StartPublisher, wire: FakeWire
) -> None:
    publisher = start_publisher(wait_replicas=2, wait_timeout_ms=50)
    wire.replicas = 2
    sink = await held_in_flight(publisher, wire)
    xadd(publisher, sink, "k", "1")
    publisher.command(sink, ("EXPIRE", "k", 60))
    wire.gate.set()
    await sink.flushed()
    assert [[c[0] for c in batch] for batch in wire.batches] == [[b"XADD", b"WAIT"], [b"XADD", b"EXPIRE", b"WAIT"]]
    assert wire.batches[0][-1] == [b"WAIT", b"2", b"50"]
    assert (sink.unacked, publisher.entries_written, publisher.entries_unacknowledged) == (0, 2, 0)
    sink.check()


async def test_entries_too_few_replicas_acknowledged_are_counted_on_their_jobs(
    start_publisher: StartPublisher, wire: FakeWire
) -> None:
    publisher = start_publisher(wait_replicas=2, wait_timeout_ms=50)
    wire.replicas = 1
    wire.refuse = lambda command: "OOM no memory" if command[-1] == b"refused" else None
    a, b = publisher.sink("a"), publisher.sink("b")
    wire.gate.clear()
    xadd(publisher, a, "k", "in flight")
    await wire.in_flight.wait()
    publisher.xadd(a, [("ka", 100), ("kt", 100)], ["n", "1"])  # one chunk, two streams
    xadd(publisher, b, "kb", "refused")  # refused: an error, not an unacknowledged entry
    publisher.command(b, ("EXPIRE", "kb", 60))  # not an entry
    wire.gate.set()
    await a.flushed()
    await b.flushed()
    assert (a.unacked, b.unacked, b.refused) == (3, 0, 1)
    assert (publisher.entries_unacknowledged, publisher.entries_written, publisher.entries_lost) == (3, 0, 1)
    with pytest.raises(PublishError, match="3 stream entries of job a were written but not acknowledged by 2 replicas "
                       r"within 50 ms") as raised:  # fmt: skip
        a.check()
    assert raised.value.lost == 0


async def test_a_wait_redis_refuses_leaves_the_batch_unacknowledged(
    start_publisher: StartPublisher, wire: FakeWire
) -> None:
    publisher = start_publisher(wait_replicas=1)
    wire.refuse = lambda command: (
        "NOPERM this user has no permissions to run the 'wait' command" if command[0] == b"WAIT" else None
    )
    sink = publisher.sink("j")
    xadd(publisher, sink, "k", "1")
    xadd(publisher, sink, "k", "2")
    await sink.flushed()
    assert (sink.unacked, sink.refused, publisher.entries_unacknowledged) == (2, 0, 2)
