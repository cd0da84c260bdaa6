"""The worker's HTTP endpoint: ``/metrics`` (Prometheus) and ``/healthz``, on ``TOKENBUS_METRICS_PORT``.

It is served by threads of its own, not by the worker's event loop: the loop is what a health
check must judge, and a loop that is stuck could not answer at all. ``/healthz`` is 200 while
the event loop keeps time (no wake-up later than ``TOKENBUS_HEALTH_MAX_LAG``) and Redis answers
a ``PING``; 503 otherwise, with the problems in the JSON body. The compose file's worker
healthcheck asks it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder

from tokenbus.schemas.errors import TokenbusError
from tokenbus.worker.loop_lag import LoopMonitor
from tokenbus.worker.metrics import RedisProbe, WorkerCollector

if TYPE_CHECKING:
    from tokenbus.worker._arq import TokenbusWorker
    from tokenbus.worker.resources import WorkerResources

logger = logging.getLogger(__name__)


class MetricsServerError(TokenbusError):
    """The metrics endpoint cannot listen where it was told to."""


class MetricsServer:
    """``/metrics`` and ``/healthz`` of one worker, from :meth:`start` until :meth:`close`."""

    def __init__(
        self, server: ThreadingHTTPServer, monitor: LoopMonitor, probe: RedisProbe, *, max_lag_s: float
    ) -> None:
        self._server = server
        self._monitor = monitor
        self._probe = probe
        self.max_lag_s = max_lag_s
        self._thread = threading.Thread(target=server.serve_forever, name="tokenbus-metrics", daemon=True)

    @classmethod
    async def start(cls, worker: TokenbusWorker, resources: WorkerResources) -> MetricsServer:
        settings = resources.settings
        assert settings.metrics_port is not None
        monitor = LoopMonitor()
        probe = RedisProbe(settings, queue=worker.queue_name, running_key=resources.keys.running)
        registry = CollectorRegistry()
        registry.register(WorkerCollector(worker, resources, monitor, probe))
        ProcessCollector(registry=registry)  # CPU seconds, resident memory, open files
        try:
            server = _Server((settings.metrics_host, settings.metrics_port), _Handler)
        except OSError as e:
            probe.close()
            where = f"{settings.metrics_host}:{settings.metrics_port} (TOKENBUS_METRICS_HOST, TOKENBUS_METRICS_PORT)"
            raise MetricsServerError(f"cannot serve metrics on {where}: {e.strerror or e}") from e
        self = cls(server, monitor, probe, max_lag_s=settings.health_max_lag_s)
        server.registry, server.health = registry, self.health
        monitor.start()
        self._thread.start()
        logger.info("metrics on http://%s:%d/metrics, health on /healthz", *self.address)
        return self

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether the worker is healthy, and why not (called on the server's threads)."""
        problems = []
        blocked = self._monitor.blocked_s()
        if blocked > self.max_lag_s:
            limit = f"TOKENBUS_HEALTH_MAX_LAG={self.max_lag_s:g}"
            problems.append(f"the event loop is blocked: {blocked:.1f}s late ({limit})")
        redis_problem = self._probe.problem()
        if redis_problem is not None:
            problems.append(f"Redis does not answer: {redis_problem}")
        status = "unhealthy" if problems else "ok"
        body = {"status": status, "problems": problems, "event_loop_lag_s": round(blocked, 3)}
        return not problems, body

    async def close(self) -> None:
        await asyncio.to_thread(self._server.shutdown)  # waits for serve_forever to return
        self._server.server_close()
        await self._monitor.close()
        self._probe.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: CollectorRegistry
    health: Any


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":  # Prometheus's text format, or OpenMetrics if the scraper asks for it
            encode, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, encode(self.server.registry), content_type)
        elif path == "/healthz":
            healthy, body = self.server.health()
            self._reply(200 if healthy else 503, orjson.dumps(body), "application/json")
        else:
            self._reply(404, b'{"error": "not found: try /metrics or /healthz"}', "application/json")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged (a scrape every few seconds would fill the log)."""
