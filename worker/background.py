"""Stopping the worker's background tasks (sweeper, leases, wake-ups) for sure."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

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
