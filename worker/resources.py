"""What a worker process opens at startup and closes at shutdown, in one place."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import httpx2
from redis.asyncio import Redis

from schemas.keys import StreamKeys
from tokenbus.offline_model import OfflineModelServer
from tokenbus.redis_client import redis_from_settings
from tokenbus.settings import Settings
from worker.emitter import JobEmitter, StreamLimits
from worker.graphs import joke_poem
from worker.orphans import Sweeper
from worker.publisher import Publisher
from worker.registry import Graph, GraphRegistry, load_graph

logger = logging.getLogger(__name__)


@dataclass
class WorkerResources:
    settings: Settings
    keys: StreamKeys
    limits: StreamLimits
    redis: Redis
    publisher: Publisher
    sweeper: Sweeper
    registry: GraphRegistry
    _stack: contextlib.AsyncExitStack

    @classmethod
    async def open(cls, settings: Settings, *, redis: Redis | None = None) -> WorkerResources:
        """Open the publisher's Redis client (unless given one), the model endpoint and the graphs."""
        async with contextlib.AsyncExitStack() as stack:
            if redis is None:
                redis = redis_from_settings(settings)
                stack.push_async_callback(redis.aclose)
            publisher = Publisher(
                redis,
                batch_max=settings.publish_batch_max,
                buffer_max=settings.publish_buffer_max,
                give_up_s=settings.publish_give_up_s,
            ).start()
            stack.push_async_callback(publisher.close)
            limits = StreamLimits(settings.tag_maxlen, settings.job_maxlen, settings.job_ttl_s)
            sweeper = Sweeper(redis, settings.keys, limits, heartbeat_s=settings.heartbeat_s).start()
            stack.push_async_callback(sweeper.close)

            base_url = settings.openai_base_url
            if settings.offline:
                model = await OfflineModelServer(tokens_per_s=settings.offline_tokens_per_s).start()
                stack.push_async_callback(model.close)
                base_url = model.base_url
                logger.info("no OPENAI_API_KEY or OPENAI_BASE_URL: using the offline model at %s", base_url)
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
                publisher=publisher,
                sweeper=sweeper,
                registry=GraphRegistry(graphs),
                _stack=stack.pop_all(),
            )
        logger.info("worker serves graphs: %s", ", ".join(resources.registry.names))
        return resources

    def emitter(self, job_id: str, attempt: int) -> JobEmitter:
        return JobEmitter(self.publisher, self.keys, self.limits, job_id, attempt)

    async def close(self) -> None:
        """Flush the publisher, then close everything opened, in reverse order."""
        await self._stack.aclose()
