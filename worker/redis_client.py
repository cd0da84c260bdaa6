"""Redis clients built from settings (one place for URL defaults and socket options)."""

from __future__ import annotations

from urllib.parse import urlsplit

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from tokenbus.worker.settings import Settings

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
REDIS_UNAVAILABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)
"""What redis-py raises when Redis cannot be reached or did not answer: retry later, on a new connection."""
REFUSED_CREDENTIALS = (redis_errors.AuthenticationError, redis_errors.AuthorizationError)
"""Connection errors to Redis that waiting does not mend: the credentials of ``REDIS_URL`` were refused."""


def redis_url(settings: Settings) -> str:
    return settings.redis_url or DEFAULT_REDIS_URL


def shown_url(url: str) -> str:
    """``url`` without its password, to print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def redis_from_settings(settings: Settings, *, socket_timeout: float | None = 30.0) -> Redis:
    """A client for ``REDIS_URL`` (``rediss://`` and ``user:password@`` work as usual)."""
    client: Redis = Redis.from_url(
        redis_url(settings),
        socket_timeout=socket_timeout,
        socket_connect_timeout=10.0,
        health_check_interval=30,
    )
    return client
