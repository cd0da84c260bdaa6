"""The gateway's Prometheus metrics (``GET /metrics``): plain counts kept where things happen,
turned into metric families when scraped, as the worker's are (:mod:`tokenbus.worker.metrics`).

An SSE client's events are counted per write (one ``int +=`` per batch of events sent), not per
event through prometheus-client; requests by route and status in a small ASGI middleware. The
README's "Operating tokenbus" table lists every metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenbus.consumer.hub import StreamHub
from tokenbus.gateway.stats import GatewayStats

OTHER_ROUTE = "other"
"""The route label of a request no route matches (a bounded set of values)."""


class GatewayCollector(Collector):
    """Every ``tokenbus_gateway_*`` metric of one gateway process."""

    def __init__(self, stats: GatewayStats, hub: Callable[[], StreamHub | None]) -> None:
        self._stats = stats
        self._hub = hub

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        yield GaugeMetricFamily("tokenbus_gateway_sse_clients", "SSE clients connected now", stats.sse_clients)
        yield CounterMetricFamily(
            "tokenbus_gateway_sse_connections", "SSE responses started (jobs' and tags' events)", stats.sse_connections
        )
        yield CounterMetricFamily(
            "tokenbus_gateway_entries_sent", "Stream entries sent to SSE clients as events (one per client)",
            stats.entries_sent,
        )  # fmt: skip
        yield CounterMetricFamily(
            "tokenbus_gateway_sent_bytes", "Bytes of SSE events written to clients (heartbeats not counted)",
            stats.bytes_sent,
        )  # fmt: skip
        yield CounterMetricFamily(
            "tokenbus_gateway_overflow_disconnects",
            "SSE clients disconnected because they did not read their events (their buffer filled)",
            stats.overflows,
        )
        yield CounterMetricFamily(
            "tokenbus_gateway_send_timeouts",
            "SSE clients dropped because one write took longer than TOKENBUS_GATEWAY_SEND_TIMEOUT",
            stats.send_timeouts,
        )
        requests = CounterMetricFamily(
            "tokenbus_gateway_requests", "HTTP requests answered, by route, method and status",
            labels=["route", "method", "status"],
        )  # fmt: skip
        for labels, count in sorted(stats.requests.items()):
            requests.add_metric(list(labels), count)
        yield requests
        hub = self._hub()
        yield GaugeMetricFamily(
            "tokenbus_gateway_hub_streams", "Streams the hub follows for its clients", hub.streams if hub else 0
        )
        yield CounterMetricFamily(
            "tokenbus_gateway_hub_reads", "XREAD round trips of the hub that returned (entries or none)",
            hub.reads if hub else 0,
        )  # fmt: skip


def gateway_registry(stats: GatewayStats, hub: Callable[[], StreamHub | None]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(GatewayCollector(stats, hub))
    ProcessCollector(registry=registry)  # CPU seconds, resident memory, open files
    return registry


class CountRequests:
    """Count each HTTP request by the path template of its route (``/jobs/{job_id}/events``),
    method and status, when its response starts (an SSE response is counted as it opens)."""

    def __init__(self, app: ASGIApp, *, stats: GatewayStats, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self._stats = stats
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route, method, started = self._route(scope), scope["method"], False

        async def counting(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                self._stats.request(route, method, int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, counting)
        except Exception:
            if not started:  # the server answers 500
                self._stats.request(route, method, 500)
            raise

    def _route(self, scope: Scope) -> str:
        for route in self._routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:  # PARTIAL: the path matches, the method does not (405)
                return str(getattr(route, "path", OTHER_ROUTE)) or OTHER_ROUTE
        return OTHER_ROUTE
