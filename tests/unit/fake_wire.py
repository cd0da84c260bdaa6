"""A stand-in for the publisher's connection (:class:`tokenbus.worker.wire.Wire`), in memory."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import hiredis
from redis import exceptions as redis_errors

from tokenbus.schemas.entries import Entry

Command = list[bytes]


def parse(packed: bytes) -> list[Command]:
    """The commands packed back to back in the Redis protocol."""
    reader = hiredis.Reader()
    reader.feed(packed)
    commands = []
    while (command := reader.gets()) is not False:
        commands.append(command)
    return commands


class FakeWire:
    """Records every batch the publisher writes and answers as the test says: ``refuse(command)``
    returns an error message for a command Redis would refuse, ``failures`` are raised by the next
    writes (Redis away), and a cleared ``gate`` holds a batch in flight until it is set."""

    def __init__(self) -> None:
        self.batches: list[list[Command]] = []
        self.refuse: Callable[[Command], str | None] = lambda command: None
        self.failures: list[Exception] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = asyncio.Event()
        self.closed = False
        self.replicas = 0
        """What a ``WAIT`` is answered with: how many replicas acknowledged."""
        self.last_reply: object = None
        self.connects = 1

    @property
    def busy(self) -> bool:
        return self.in_flight.is_set()

    async def execute(self, packed: bytes, count: int) -> list[tuple[int, redis_errors.ResponseError]]:
        commands = parse(packed)
        assert len(commands) == count
        self.in_flight.set()
        await self.gate.wait()
        self.in_flight.clear()
        if self.failures:
            raise self.failures.pop(0)
        self.batches.append(commands)
        refused = [(i, redis_errors.ResponseError(why)) for i, c in enumerate(commands) if (why := self.refuse(c))]
        self.last_reply = self.replicas if commands and commands[-1][0] == b"WAIT" else b"1-0"
        return refused

    async def close(self) -> None:
        self.closed = True

    @property
    def commands(self) -> list[Command]:
        return [command for batch in self.batches for command in batch]

    def stream(self, key: str) -> list[Entry]:
        """The entries written to ``key``, in order, as a reader would decode them."""
        return [
            Entry.decode(command[6:], stream=key)
            for command in self.commands
            if command[0] == b"XADD" and command[1] == key.encode()
        ]
