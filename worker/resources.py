"""What a worker process opens at startup and closes at shutdown, in one place."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx2
from redis.asyncio import Redis

from tokenbus.schemas.keys import StreamKeys
from tokenbus.worker.emitter import JobEmitter, StreamLimits
from tokenbus.worker.graphs import joke_poem
from tokenbus.worker.offline_model import OfflineModelServer
from tokenbus.worker.orphans import Sweeper
from tokenbus.worker.publisher import Publisher
from tokenbus.worker.redis_client import StreamsRedis, redis_from_settings, streams_from_settings
from tokenbus.worker.registry import Graph, GraphRegistry, load_graph
from tokenbus.worker.settings import Settings
from tokenbus.worker.stats import JobStats

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class WorkerResources:
    settings: Settings
    keys: StreamKeys
    limits: StreamLimits
    redis: StreamsRedis
    """The streams' deployment: every key under the prefix (a Redis Cluster, possibly)."""
    queue: Redis
    """The queue's Redis: arq's keys (the leases, the sweeper's look at a job's claim and retries)."""
    publisher: Publisher
    sweeper: Sweeper
    registry: GraphRegistry
    jobs: JobStats
    """Jobs started and finished, per graph, for the metrics endpoint."""
    _stack: contextlib.AsyncExitStack
    _tracked: set[asyncio.Task[Any]] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)
    """Jobs whose final terminal entry this worker wrote and that arq has not finished yet."""

    @classmethod
    async def open(
        cls, settings: Settings, *, redis: StreamsRedis | None = None, queue: Redis | None = None
    ) -> WorkerResources:
        """Open the clients of the streams and of the queue (unless given them: a given ``redis``
        alone serves both, as one Redis), the model endpoint and the graphs."""
        async with contextlib.AsyncExitStack() as stack:
            if queue is None and isinstance(redis, Redis) and not settings.streams_apart:
                queue = redis
            if queue is None:
                queue = redis_from_settings(settings)
                stack.push_async_callback(queue.aclose)
            if redis is None:
                redis = queue if not settings.streams_apart else streams_from_settings(settings)
                if redis is not queue:
                    stack.push_async_callback(redis.aclose)
            publisher = Publisher(
                redis,
                batch_max=settings.publish_batch_max,
                buffer_max=settings.publish_buffer_max,
                give_up_s=settings.publish_give_up_s,
                coalesce_after=settings.coalesce_after if settings.coalesce == "adaptive" else None,
                wait_replicas=settings.wait_replicas,
                wait_timeout_ms=settings.wait_timeout_ms,
            ).start()
            stack.push_async_callback(publisher.close)
            limits = StreamLimits(
                settings.tag_maxlen, settings.job_maxlen, settings.job_ttl_s, settings.state_max_bytes,
                tag_ttl_s=settings.tag_ttl_s,
            )  # fmt: skip
            sweeper = Sweeper(
                redis,
                settings.keys,
                limits,
                queue=queue,
                heartbeat_s=settings.heartbeat_s,
                max_tries=settings.max_tries,
            ).start()
            stack.push_async_callback(sweeper.close)

            base_url = settings.openai_base_url
            if settings.offline:
                model = await OfflineModelServer(tokens_per_s=settings.offline_tokens_per_s).start()
                stack.push_async_callback(model.close)
                base_url = model.base_url
                stack.callback(_offline_environment(base_url))
                logger.info("no OPENAI_API_KEY or OPENAI_BASE_URL: every graph uses the offline model at %s", base_url)
            http = httpx2.AsyncClient(
                timeout=httpx2.Timeout(60.0, connect=10.0), limits=httpx2.Limits(max_connections=200)
            )
            stack.push_async_callback(http.aclose)
            api_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else "offline"
            endpoint = joke_poem.ModelEndpoint(settings.model, base_url, api_key, http)
            graphs: dict[str, Graph] = {joke_poem.NAME: joke_poem.build(endpoint)}
            graphs.update({name: load_graph(path) for name, path in settings.graphs.items()})

            resources = cls(
                settings=settings,
                keys=settings.keys,
                limits=limits,
                redis=redis,
                queue=queue,
                publisher=publisher,
                sweeper=sweeper,
                registry=GraphRegistry(graphs),
                jobs=JobStats(list(graphs)),
                _stack=stack.pop_all(),
            )
        return resources

    def track(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``coroutine`` as a task that :meth:`close` waits for (terminal entries)."""
        task = asyncio.ensure_future(coroutine)
        self._tracked.add(task)
        task.add_done_callback(self._tracked.discard)
        return task

    def emitter(self, job_id: str, attempt: int) -> JobEmitter:
        return JobEmitter(self.publisher, self.keys, self.limits, job_id, attempt)

    async def close(self) -> None:
        """Let terminal entries being written finish, flush the publisher, close the rest."""
        if self._tracked:
            await asyncio.wait(list(self._tracked), timeout=self.settings.publish_give_up_s + 10)
        await self._stack.aclose()


def _offline_environment(base_url: str) -> Callable[[], None]:
    """Point the openai clients that user graphs make themselves (``ChatOpenAI()``,
    ``AsyncOpenAI()``, which read ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY``) at the offline model;
    return what puts the environment back."""
    saved = {name: os.environ.get(name) for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY")}
    os.environ["OPENAI_BASE_URL"], os.environ["OPENAI_API_KEY"] = base_url, "offline"

    def restore() -> None:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    return restore
