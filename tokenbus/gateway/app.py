"""The HTTP gateway: enqueue, inspect and cancel jobs, and follow jobs and tags over SSE.

A Starlette application, stateless apart from Redis: any number of processes can serve behind a
load balancer (subscribe tokens verify in every process that shares the keys or the secret).
Each process reads the streams its clients follow through one :class:`StreamHub`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from importlib.resources import files
from pathlib import Path
from typing import Any

import orjson
from arq.constants import in_progress_key_prefix, job_key_prefix
from prometheus_client.exposition import choose_encoder
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenbus.consumer.hub import NotAStream, StreamHub
from tokenbus.consumer.jobs import JobView, job_result
from tokenbus.consumer.redis_errors import REDIS_UNAVAILABLE
from tokenbus.gateway.access import LOOPBACK_ONLY, Access, Grant, Refused, is_loopback
from tokenbus.gateway.events import BadCursor, EventStream, Filters
from tokenbus.gateway.metrics import CountRequests, gateway_registry
from tokenbus.gateway.settings import GatewaySettings
from tokenbus.gateway.stats import GatewayStats
from tokenbus.schemas.entries import EntryType
from tokenbus.schemas.errors import InvalidJobId, InvalidJobRequest, InvalidTag, UnknownGraph
from tokenbus.schemas.job import JobRequest
from tokenbus.schemas.keys import StreamKeys, validate_job_id, validate_tag
from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.redis_client import StreamsRedis, redis_from_settings, streams_from_settings
from tokenbus.worker.settings import Settings

logger = logging.getLogger(__name__)

STATIC = Path(str(files("tokenbus.gateway").joinpath("static")))
MAX_BODY_BYTES = 1 << 20
CLIENT_BUFFER_BYTES = 1 << 20


class Gateway:
    """The application's state: clients created at startup and closed at shutdown."""

    def __init__(self, settings: Settings, gateway: GatewaySettings) -> None:
        self.settings = settings
        self.config = gateway
        self.keys = StreamKeys(settings.prefix)
        secret = gateway.token_secret.get_secret_value() if gateway.token_secret else None
        self.access = Access(gateway.api_keys, secret=secret, token_ttl_s=gateway.token_ttl_s)
        self._redis: Redis | None = None
        self._streams: StreamsRedis | None = None
        self._client: TokenbusClient | None = None
        self._hub: StreamHub | None = None
        self.stats = GatewayStats()
        self.registry = gateway_registry(self.stats, lambda: self._hub)

    @property
    def redis(self) -> Redis:
        """The queue's Redis (arq's keys)."""
        assert self._redis is not None, "the gateway is not started"
        return self._redis

    @property
    def streams(self) -> StreamsRedis:
        """The streams' deployment (``TOKENBUS_STREAMS_URL``; the queue's Redis by default)."""
        assert self._streams is not None, "the gateway is not started"
        return self._streams

    @property
    def client(self) -> TokenbusClient:
        assert self._client is not None, "the gateway is not started"
        return self._client

    @property
    def hub(self) -> StreamHub:
        assert self._hub is not None, "the gateway is not started"
        return self._hub

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self.access.loopback_only:
            logger.warning("no API key configured (TOKENBUS_GATEWAY_API_KEYS): serving loopback clients only")
        self._redis = redis_from_settings(self.settings)
        self._streams = streams_from_settings(self.settings) if self.settings.streams_apart else self._redis
        self._client = TokenbusClient.sharing(self._redis, self.settings, streams=self._streams)
        try:
            async with StreamHub(self._streams, window=self.config.window) as self._hub:
                yield
        finally:
            if self._streams is not self._redis:
                await self._streams.aclose()
            await self._redis.aclose()

    # -- requests --------------------------------------------------------------------------------
    def grant(self, request: Request, *, need_key: bool = False) -> Grant:
        authorization = request.headers.get("authorization", "")
        scheme, _, credential = authorization.partition(" ")
        bearer = credential.strip() if scheme.lower() == "bearer" and credential.strip() else None
        host = request.client.host if request.client else None
        return self.access.check(
            client_host=host, bearer=bearer, token=request.query_params.get("token"), need_key=need_key
        )

    async def config_info(self, request: Request) -> Response:
        return JSONResponse({"auth": not self.access.loopback_only, "heartbeat_s": self.config.heartbeat_s})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        """Prometheus's text format (or OpenMetrics, if the scraper asks for it); an API key or,
        without keys, loopback only, like every reading of the whole deployment."""
        self.grant(request, need_key=True)
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(self.registry), media_type=content_type)

    async def readyz(self, request: Request) -> Response:
        try:
            await self.redis.ping()
            if self.streams is not self.redis:
                await self.streams.ping()
        except (*REDIS_UNAVAILABLE, redis_errors.RedisClusterException) as e:
            return JSONResponse({"status": "unavailable", "detail": f"Redis does not answer: {e}"}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def create_job(self, request: Request) -> Response:
        self.grant(request, need_key=True)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise InvalidJobRequest(f"the request body is {len(body)} bytes; at most {MAX_BODY_BYTES} are read")
        try:
            raw = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise InvalidJobRequest(f"the body is not JSON: {e}") from None
        # a graph no live worker serves is refused now (422), not left to fail on a worker
        job_id = await self.client.enqueue_request(JobRequest.parse(raw), check_graph=True)
        token, expires = self.access.issue(jobs=[job_id])
        return JSONResponse(
            {
                "job_id": job_id,
                "token": token,
                "token_expires": expires,
                "urls": {"job": f"/jobs/{job_id}", "events": f"/jobs/{job_id}/events", "cancel": f"/jobs/{job_id}"},
            },
            status_code=201,
        )

    async def create_token(self, request: Request) -> Response:
        self.grant(request, need_key=True)
        try:
            raw = orjson.loads(await request.body())
            jobs = [validate_job_id(j) for j in raw.get("jobs", [])]
            tags = [validate_tag(t) for t in raw.get("tags", [])]
            ttl_s = int(raw.get("ttl_s", self.access.token_ttl_s))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
            if isinstance(e, InvalidJobId | InvalidTag):
                raise
            expected = '{"jobs": [...], "tags": [...], "ttl_s": N}'
            raise Refused(400, "invalid_request", f"expected {expected}: {e}") from None
        if not jobs and not tags:
            raise Refused(400, "invalid_request", "a token grants some jobs or tags: give at least one")
        if not 1 <= ttl_s <= self.config.token_ttl_s:
            raise Refused(400, "invalid_request", f"ttl_s must be 1 to {self.config.token_ttl_s}")
        token, expires = self.access.issue(jobs=jobs, tags=tags, ttl_s=ttl_s)
        return JSONResponse({"token": token, "expires": expires})

    async def get_job(self, request: Request) -> Response:
        job_id = validate_job_id(request.path_params["job_id"])
        self.grant(request).job(job_id)
        view = await job_result(self.streams, job_id, prefix=self.settings.prefix)
        status = await self._status(job_id, view)
        timings = {"started_ms": view.started_ts, "first_chunk_ms": view.first_chunk_ts, "ended_ms": view.ended_ts}
        body = {
            "job_id": job_id, "status": status, "attempt": view.attempt, "chunks": view.chunks, "text": view.text,
            "texts": view.texts, "node_texts": view.node_texts, "error": view.error, "complete": view.complete,
            "missing": view.missing, "timings": timings, "result": view.result, "updates": view.updates,
            "state": view.state,
        }  # fmt: skip
        return JSONResponse(body)

    async def _status(self, job_id: str, view: JobView) -> str:
        if view.status is not None:
            return view.status.value
        if view.next_seq > 0:
            return "running"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(job_key_prefix + job_id)
            pipe.exists(in_progress_key_prefix + job_id)
            queued, in_progress = await pipe.execute()
        if in_progress:
            return "running"
        if queued:
            return "queued"
        raise Refused(404, "not_found", f"no job {job_id}: never enqueued, or its stream has expired")

    async def cancel_job(self, request: Request) -> Response:
        self.grant(request, need_key=True)
        job_id = validate_job_id(request.path_params["job_id"])
        view = await job_result(self.streams, job_id, prefix=self.settings.prefix)
        status = await self._status(job_id, view)
        if view.done:
            raise Refused(409, "ended", f"job {job_id} has already ended: {status}")
        await self.client.abort(job_id)
        return JSONResponse({"job_id": job_id, "status": "cancelling"}, status_code=202)

    async def job_events(self, request: Request) -> Response:
        job_id = validate_job_id(request.path_params["job_id"])
        self.grant(request).job(job_id)
        stream = EventStream(
            self.streams, self.hub, [self.keys.job(job_id)], job=job_id, filters=filters_of(request),
            cursor=cursor_of(request), buffer_bytes=CLIENT_BUFFER_BYTES, retry_ms=self.config.retry_ms,
            stats=self.stats,
        )  # fmt: skip
        await stream.prepare()
        if stream.ended:
            return Response(status_code=204)  # resumed after the end: EventSource stops reconnecting
        if not await self.streams.exists(self.keys.job(job_id)):
            await self._status(job_id, JobView(job_id))  # 404 for a job neither run nor queued, or expired
        return self._sse(stream)

    async def tag_events(self, request: Request) -> Response:
        tags = list(dict.fromkeys([request.path_params["tag"], *request.query_params.getlist("tag")]))
        for tag in tags:
            validate_tag(tag)
        self.grant(request).tag_streams(tags)
        tag_streams = {self.keys.tag(t): t for t in tags}
        stream = EventStream(
            self.streams, self.hub, list(tag_streams), tag_streams=tag_streams,
            filters=filters_of(request, by_tag=False),
            cursor=cursor_of(request), buffer_bytes=CLIENT_BUFFER_BYTES, retry_ms=self.config.retry_ms,
            stats=self.stats,
        )  # fmt: skip
        await stream.prepare()
        return self._sse(stream)

    def _sse(self, stream: EventStream) -> Response:
        return _EventSource(
            stream, stats=self.stats, ping=self.config.heartbeat_s, send_timeout=self.config.send_timeout_s,
        )  # fmt: skip

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html")


class _EventSource(EventSourceResponse):
    """An SSE response that counts the clients dropped for a write that took too long."""

    def __init__(self, content: Any, *, stats: GatewayStats, **options: Any) -> None:
        super().__init__(content, **options)
        self._stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            self._stats.send_timeouts += 1
            raise


def cursor_of(request: Request) -> str | None:
    return request.headers.get("last-event-id") or request.query_params.get("since") or None


def filters_of(request: Request, *, by_tag: bool = True) -> Filters:
    """The entry filters of a request; ``by_tag=False`` where ``?tag=`` names streams to follow."""
    params = request.query_params
    try:
        types = frozenset(EntryType(t) for t in params.getlist("type"))
    except ValueError:
        known = ", ".join(t.value for t in EntryType)
        raise Refused(400, "invalid_request", f"unknown type in ?type=; known types: {known}") from None
    tags = frozenset(validate_tag(t) for t in params.getlist("tag")) if by_tag else frozenset()
    return Filters(nodes=frozenset(params.getlist("node")), types=types, tags=tags)


def _error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)
    return _error(exc.status, exc.error, exc.detail)


async def _invalid(request: Request, exc: Exception) -> Response:
    error = "invalid_request" if isinstance(exc, InvalidJobRequest) else "invalid_name"
    return _error(422 if isinstance(exc, InvalidJobRequest) else 400, error, str(exc))


async def _unknown_graph(request: Request, exc: Exception) -> Response:
    return _error(422, "unknown_graph", str(exc))


async def _bad_cursor(request: Request, exc: Exception) -> Response:
    return _error(400, "invalid_cursor", str(exc))


async def _unavailable(request: Request, exc: Exception) -> Response:
    logger.warning("%s %s: Redis is unavailable: %s", request.method, request.url.path, exc)
    return _error(503, "redis_unavailable", "Redis does not answer; try again shortly")


async def _not_a_stream(request: Request, exc: Exception) -> Response:
    return _error(409, "not_a_stream", str(exc))


async def _redis_refused(request: Request, exc: Exception) -> Response:
    logger.warning("%s %s: Redis refused a command: %s", request.method, request.url.path, exc)
    return _error(500, "redis_error", f"Redis refused a command: {exc}")


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, "http_error", str(exc.detail))


def create_app(settings: Settings, gateway: GatewaySettings) -> Starlette:
    """The ASGI application of ``tokenbus serve``."""
    g = Gateway(settings, gateway)
    handlers: dict[Any, Callable[[Request, Exception], Coroutine[Any, Any, Response]]] = {
        Refused: _refused,
        InvalidJobRequest: _invalid,
        InvalidJobId: _invalid,
        InvalidTag: _invalid,
        UnknownGraph: _unknown_graph,
        BadCursor: _bad_cursor,
        HTTPException: _http,
        **{error: _unavailable for error in REDIS_UNAVAILABLE},
        redis_errors.ResponseError: _redis_refused,
        NotAStream: _not_a_stream,
    }
    routes = [
        Route("/", g.index),
        Route("/config", g.config_info),
        Route("/healthz", g.healthz),
        Route("/readyz", g.readyz),
        Route("/metrics", g.metrics),
        Route("/jobs", g.create_job, methods=["POST"]),
        Route("/tokens", g.create_token, methods=["POST"]),
        Route("/jobs/{job_id}", g.get_job, methods=["GET"]),
        Route("/jobs/{job_id}", g.cancel_job, methods=["DELETE"]),
        Route("/jobs/{job_id}/events", g.job_events),
        Route("/tags/{tag}/events", g.tag_events),
        Mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static"),
    ]
    middleware = [Middleware(CountRequests, stats=g.stats, routes=routes)]
    if g.access.loopback_only:
        middleware.append(Middleware(LoopbackOnly))
    app = Starlette(routes=routes, lifespan=g.lifespan, exception_handlers=handlers, middleware=middleware)
    app.state.gateway = g
    return app


class LoopbackOnly:
    """Without API keys, refuse every request that does not come from this machine."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] == "http" and not is_loopback(client[0] if client else None):
            response = _error(403, "forbidden", LOOPBACK_ONLY)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
