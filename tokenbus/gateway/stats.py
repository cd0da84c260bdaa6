"""What a gateway process counts, in plain ints, for :mod:`tokenbus.gateway.metrics` to read when scraped.

Counting happens where things happen (an SSE client's writes, a request's response), on the
gateway's event loop, so nothing here needs a lock or calls prometheus-client.
"""

from __future__ import annotations


class GatewayStats:
    """What one gateway process counts, in plain ints (everything runs on its event loop)."""

    def __init__(self) -> None:
        self.sse_clients = 0
        self.sse_connections = 0
        self.entries_sent = 0
        self.bytes_sent = 0
        self.overflows = 0
        self.send_timeouts = 0
        self.requests: dict[tuple[str, str, str], int] = {}

    def request(self, route: str, method: str, status: int) -> None:
        key = (route, method, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
