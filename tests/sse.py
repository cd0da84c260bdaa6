"""A small SSE client for the gateway's tests: events as the EventSource spec parses them."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import orjson


@dataclass
class Event:
    event: str = "message"
    data: str = ""
    id: str | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> Any:
        return orjson.loads(self.data)


async def events(response: httpx2.Response) -> AsyncIterator[Event]:
    """The events of an open SSE response, comments (heartbeats) included as events of their own."""
    event, data = Event(), []
    async for line in response.aiter_lines():
        if line == "":
            if data or event.id is not None or event.comments:
                event.data = "\n".join(data)
                yield event
            event, data = Event(), []
        elif line.startswith(":"):
            event.comments.append(line[1:].strip())
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                event.event = value
            elif name == "id":
                event.id = value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
