"""Redis clients built from settings (one place for URL defaults, socket options and deployments).

Two deployments, which may be one: the **queue** (arq's keys and the wake-up channel: one Redis,
``REDIS_URL``, or the master that ``TOKENBUS_SENTINELS`` name) and the **streams** (every key under
the prefix: ``TOKENBUS_STREAMS_URL``, a single Redis or a Redis Cluster; by default the queue's).
"""

from __future__ import annotations

from typing import Any, TypeAlias
from urllib.parse import urlsplit

from arq.connections import ArqRedis, RedisSettings
from redis import exceptions as redis_errors
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff

from tokenbus.worker.settings import Settings

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
REDIS_UNAVAILABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)
"""What redis-py raises when Redis cannot be reached or did not answer: retry later, on a new connection."""
REFUSED_CREDENTIALS = (redis_errors.AuthenticationError, redis_errors.AuthorizationError)
"""Connection errors to Redis that waiting does not mend: the credentials of ``REDIS_URL`` were refused."""

StreamsRedis: TypeAlias = Redis | RedisCluster
"""A client of the streams' deployment: a single Redis, or a Redis Cluster."""


def redis_url(settings: Settings) -> str:
    return settings.redis_url or DEFAULT_REDIS_URL


def streams_url(settings: Settings) -> str:
    """The URL of the streams' deployment (a seed node of a cluster)."""
    return settings.streams_url or redis_url(settings)


def shown_url(url: str) -> str:
    """``url`` without its password, to print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def _options(socket_timeout: float | None) -> dict[str, Any]:
    return {"socket_timeout": socket_timeout, "socket_connect_timeout": 10.0, "health_check_interval": 30}


def redis_from_settings(settings: Settings, *, socket_timeout: float | None = 30.0) -> Redis:
    """A client of the queue's Redis: ``REDIS_URL`` (``rediss://`` and ``user:password@`` work as
    usual), or the master the Sentinels of ``TOKENBUS_SENTINELS`` name, followed through failovers."""
    if settings.sentinels is None:
        client: Redis = Redis.from_url(redis_url(settings), **_options(socket_timeout))
        return client
    return sentinel_master(settings, **_options(socket_timeout))


def arq_settings(settings: Settings) -> RedisSettings:
    """arq's connection to the queue's Redis: ``REDIS_URL``, or through the Sentinels of
    ``TOKENBUS_SENTINELS`` to the master they name (``REDIS_URL`` then gives its credentials,
    database and TLS; arq's Sentinel pool takes no retry policy of its own)."""
    redis_settings = RedisSettings.from_dsn(redis_url(settings))
    if settings.sentinels is not None:
        redis_settings.host = settings.sentinel_addresses
        redis_settings.sentinel = True
        redis_settings.sentinel_master = settings.sentinel_master
    return redis_settings


def sentinel_master(settings: Settings, *, redis_class: type[Redis] | None = None, **options: Any) -> Redis:
    """A client of ``TOKENBUS_SENTINEL_MASTER`` as the Sentinels name it now: each new connection
    asks them where the master is. ``REDIS_URL`` gives the user, password, database and TLS.
    Closing it closes its clients of the Sentinels too."""
    url = parse_url(redis_url(settings))
    credentials: dict[str, Any] = {name: url[name] for name in ("username", "password", "db") if name in url}
    if url.get("connection_class") is SSLConnection:
        credentials["ssl"] = True
    # a command on a connection to a master that is gone reconnects: to the master the Sentinels name now
    options.setdefault("retry", Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=5))
    options.setdefault("retry_on_error", [redis_errors.ConnectionError, redis_errors.TimeoutError])
    # the Sentinels' own connections: the socket options, and their password if they ask for one
    # (redis-py gives them only the socket options unless told otherwise)
    sentinel_kwargs = {name: value for name, value in options.items() if name.startswith("socket_")}
    if settings.sentinel_password is not None:
        sentinel_kwargs["password"] = settings.sentinel_password.get_secret_value()
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        settings.sentinel_addresses, sentinel_kwargs=sentinel_kwargs, **credentials, **options
    )
    client = sentinel.master_for(settings.sentinel_master, redis_class=redis_class or _SentinelMaster)
    assert isinstance(client, _SentinelMaster | _ArqSentinelMaster)
    client.sentinels = sentinel.sentinels
    return client


def arq_sentinel_pool(settings: Settings, **attributes: Any) -> ArqRedis:
    """arq's pool for a queue behind Sentinel (``attributes``: the serializers and queue name that
    arq's ``create_pool`` sets): made here rather than by arq, whose Sentinel pool is never closed
    with its clients of the Sentinels, and takes no retry policy."""
    pool = sentinel_master(settings, redis_class=_ArqSentinelMaster, socket_connect_timeout=10.0)
    assert isinstance(pool, ArqRedis)
    for name, value in attributes.items():
        setattr(pool, name, value)
    return pool


async def _close_all(clients: list[Redis]) -> None:
    for client in clients:
        await client.aclose()


class _SentinelMaster(Redis):
    """A Sentinel master's client that closes its clients of the Sentinels with its own pool."""

    sentinels: list[Redis] = []  # set per instance by sentinel_master()

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        await _close_all(self.sentinels)


class _ArqSentinelMaster(ArqRedis):
    """arq's pool on a Sentinel master, closing its clients of the Sentinels with it."""

    sentinels: list[Redis] = []  # set per instance by sentinel_master()

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        await _close_all(self.sentinels)


def streams_from_settings(settings: Settings, *, socket_timeout: float | None = 30.0) -> StreamsRedis:
    """A client of the streams' deployment: a :class:`RedisCluster` with ``TOKENBUS_STREAMS_CLUSTER``
    (it learns the nodes from the node of ``TOKENBUS_STREAMS_URL``), else a single Redis (by
    default the queue's: a client of its own all the same)."""
    if settings.streams_cluster:
        cluster: RedisCluster = RedisCluster.from_url(
            streams_url(settings), socket_timeout=socket_timeout, socket_connect_timeout=10.0
        )
        return cluster
    if settings.streams_url is None:
        return redis_from_settings(settings, socket_timeout=socket_timeout)
    client: Redis = Redis.from_url(settings.streams_url, **_options(socket_timeout))
    return client
