"""The worker's background loops (sweeper, leases, wake-ups): started, and stopped for sure."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, ClassVar, Self

from tokenbus.schemas.errors import ClientStateError

RECANCEL_S = 0.1


async def stop(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended.

    One ``cancel()`` is not always enough on Python 3.11: ``asyncio.wait_for`` (which redis-py
    awaits through) swallows a cancellation that lands as the call it waits for completes, and a
    loop that carries on would keep the worker from ever exiting. So the cancellation is repeated
    until the task ends.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_S)
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.result()  # retrieved: an error of a stopped loop was logged by the loop itself


class Background:
    """A component that runs one loop in a task of its own (:meth:`_loop`), from :meth:`start`
    until :meth:`close`."""

    task_name: ClassVar[str] = "tokenbus-background"
    _task: asyncio.Task[None] | None = None

    def start(self) -> Self:
        if self._task is not None:
            raise ClientStateError(f"{self.task_name} already started")
        self._task = asyncio.create_task(self._loop(), name=self.task_name)
        return self

    async def close(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            await stop(task)

    async def _loop(self) -> None:
        raise NotImplementedError
