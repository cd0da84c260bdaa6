"""All configuration, read once from the environment at the entry point and passed down."""

from __future__ import annotations

from typing import Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tokenbus.schemas.keys import StreamKeys
from tokenbus.schemas.state import DEFAULT_STATE_MAX_BYTES, MIN_STATE_MAX_BYTES


class Settings(BaseSettings):
    """Every environment variable tokenbus reads. The README's configuration table mirrors this."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True, env_ignore_empty=True)

    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    """The queue's Redis (arq's keys, the wake-up channel), and the streams' unless ``TOKENBUS_STREAMS_URL`` is set."""
    sentinels: str | None = Field(default=None, validation_alias="TOKENBUS_SENTINELS")
    """``host:port,host:port...`` of Redis Sentinels: the queue's Redis is the master they name
    (``TOKENBUS_SENTINEL_MASTER``); ``REDIS_URL`` then gives only its user, password, database and TLS."""
    sentinel_master: str = Field(default="mymaster", min_length=1, validation_alias="TOKENBUS_SENTINEL_MASTER")
    sentinel_password: SecretStr | None = Field(default=None, validation_alias="TOKENBUS_SENTINEL_PASSWORD")
    """What the Sentinels themselves ask for (their ``requirepass``); ``REDIS_URL``'s password is
    the master's. Unset: the Sentinels are asked nothing."""
    streams_url: str | None = Field(default=None, validation_alias="TOKENBUS_STREAMS_URL")
    """Where the ``<prefix>:`` keys live (streams, running, finished, workers, dead letters);
    unset: on the queue's Redis (``REDIS_URL``, or its Sentinel master)."""
    streams_cluster: bool = Field(default=False, validation_alias="TOKENBUS_STREAMS_CLUSTER")
    """``TOKENBUS_STREAMS_URL`` is a node of a Redis Cluster (said, not detected: a client that
    guessed wrong would send cross-slot commands, or route a single Redis's keys by slot)."""
    prefix: str = Field(default="tokenbus", validation_alias="TOKENBUS_PREFIX")
    queue_name: str = Field(default="tokenbus:queue", validation_alias="TOKENBUS_QUEUE")

    openai_api_key: SecretStr | None = Field(default=None, validation_alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(default=None, validation_alias="OPENAI_BASE_URL")
    model: str = Field(default="gpt-4o-mini", validation_alias="TOKENBUS_MODEL")
    offline_tokens_per_s: float = Field(default=100.0, ge=0, validation_alias="TOKENBUS_OFFLINE_TOKENS_PER_S")
    graphs: dict[str, str] = Field(default_factory=dict, validation_alias="TOKENBUS_GRAPHS")

    tag_maxlen: int = Field(default=100_000, ge=1, validation_alias="TOKENBUS_TAG_MAXLEN")
    job_maxlen: int = Field(default=100_000, ge=1, validation_alias="TOKENBUS_JOB_MAXLEN")
    job_ttl_s: int = Field(default=86_400, ge=1, validation_alias="TOKENBUS_JOB_TTL")
    tag_ttl_s: int | None = Field(default=None, ge=1, validation_alias="TOKENBUS_TAG_TTL")
    """Seconds a tag stream lives after the last attempt that wrote to it (each attempt sets it at
    its first write to the stream and at its end); unset: tag streams never expire."""

    job_timeout_s: float = Field(default=300.0, gt=0, validation_alias="TOKENBUS_JOB_TIMEOUT")
    max_job_timeout_s: float = Field(default=900.0, gt=0, validation_alias="TOKENBUS_MAX_JOB_TIMEOUT")
    max_jobs: int = Field(default=50, ge=1, validation_alias="TOKENBUS_MAX_JOBS")
    poll_delay_s: float = Field(default=1.0, gt=0, validation_alias="TOKENBUS_POLL_DELAY")
    max_tries: int = Field(default=5, ge=1, validation_alias="TOKENBUS_MAX_TRIES")
    shutdown_grace_s: int = Field(default=30, ge=0, validation_alias="TOKENBUS_SHUTDOWN_GRACE")
    heartbeat_s: float = Field(default=5.0, gt=0, validation_alias="TOKENBUS_HEARTBEAT")
    lease_s: float | None = Field(default=None, gt=0, validation_alias="TOKENBUS_LEASE")
    max_request_bytes: int = Field(default=1 << 20, ge=1024, validation_alias="TOKENBUS_MAX_REQUEST_BYTES")
    state_max_bytes: int = Field(
        default=DEFAULT_STATE_MAX_BYTES, ge=MIN_STATE_MAX_BYTES, validation_alias="TOKENBUS_STATE_MAX_BYTES"
    )

    publish_batch_max: int = Field(default=4096, ge=1, validation_alias="TOKENBUS_PUBLISH_BATCH")
    publish_buffer_max: int = Field(default=100_000, ge=1, validation_alias="TOKENBUS_PUBLISH_BUFFER")
    publish_give_up_s: float = Field(default=30.0, gt=0, validation_alias="TOKENBUS_PUBLISH_GIVE_UP")
    coalesce: Literal["off", "adaptive"] = Field(default="off", validation_alias="TOKENBUS_COALESCE")
    """``adaptive``: while the publisher is congested, chunks of one model call still waiting in its
    buffer are merged into one entry (``worker/coalesce.py``; contract field ``n``)."""
    coalesce_after: int = Field(default=256, ge=1, validation_alias="TOKENBUS_COALESCE_AFTER")
    """Calls waiting in the publisher's buffer from which it counts as congested (``adaptive`` only)."""
    wait_replicas: int = Field(default=0, ge=0, validation_alias="TOKENBUS_WAIT_REPLICAS")
    """Replicas that must acknowledge each publish pipeline (``WAIT``) before its entries count as
    written; 0: no ``WAIT``. On a Redis Cluster (``TOKENBUS_STREAMS_CLUSTER``), replicas of the
    master each pipeline went to: each master's pipeline ends with its own ``WAIT``."""
    wait_timeout_ms: int = Field(default=1000, ge=1, le=20_000, validation_alias="TOKENBUS_WAIT_TIMEOUT_MS")
    """How long each ``WAIT`` waits for them (below the publisher's 30 s reply timeout)."""

    metrics_port: int | None = Field(default=None, ge=0, le=65535, validation_alias="TOKENBUS_METRICS_PORT")
    """Port of the worker's ``/metrics`` and ``/healthz``; unset: no endpoint (0: any free port)."""
    metrics_host: str = Field(default="127.0.0.1", min_length=1, validation_alias="TOKENBUS_METRICS_HOST")
    health_max_lag_s: float = Field(default=5.0, gt=0, validation_alias="TOKENBUS_HEALTH_MAX_LAG")
    """``/healthz`` fails while the event loop has not run for this many seconds (a stuck loop)."""

    @field_validator("redis_url", "streams_url")
    @classmethod
    def _valid_redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_redis_url(value)
        return value

    @field_validator("sentinels")
    @classmethod
    def _valid_sentinels(cls, value: str | None) -> str | None:
        if value is not None:
            parse_sentinels(value)
        return value

    @model_validator(mode="after")
    def _deployments_fit(self) -> Settings:
        if self.streams_cluster and self.streams_url is None:
            raise ValueError(
                "TOKENBUS_STREAMS_CLUSTER needs TOKENBUS_STREAMS_URL (a node of the cluster): "
                "the queue cannot live on a Redis Cluster (arq's keys cross slots)"
            )
        if self.streams_cluster and self.streams_url is not None and self.streams_url.startswith("unix:"):
            raise ValueError("a Redis Cluster is reached over TCP: TOKENBUS_STREAMS_URL cannot be a unix:// socket")
        if self.sentinels is not None and self.redis_url is not None and self.redis_url.startswith("unix:"):
            raise ValueError("with TOKENBUS_SENTINELS, REDIS_URL gives credentials over TCP, not a unix:// socket")
        return self

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        StreamKeys(value)
        return value

    @model_validator(mode="after")
    def _tag_streams_outlive_jobs(self) -> Settings:
        longest = max(self.job_timeout_s, self.max_job_timeout_s)
        if self.tag_ttl_s is not None and self.tag_ttl_s < longest:
            raise ValueError(
                f"TOKENBUS_TAG_TTL ({self.tag_ttl_s}s) must be at least the longest a job may run "
                f"(TOKENBUS_MAX_JOB_TIMEOUT, {longest:g}s): a tag stream must not expire under a running job"
            )
        return self

    @model_validator(mode="after")
    def _lease_outlives_heartbeat(self) -> Settings:
        if self.lease_s is not None and self.lease_s <= self.heartbeat_s:
            raise ValueError(
                f"TOKENBUS_LEASE ({self.lease_s:g}s) must be longer than TOKENBUS_HEARTBEAT ({self.heartbeat_s:g}s), "
                "which renews it; three heartbeats is the default"
            )
        return self

    @property
    def keys(self) -> StreamKeys:
        return StreamKeys(self.prefix)

    @property
    def lease(self) -> float:
        """Seconds a worker's claim on a running job lasts unless renewed (default: three
        heartbeats): how soon a killed worker's job runs again."""
        return self.lease_s if self.lease_s is not None else 3 * self.heartbeat_s

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """The Sentinels of ``TOKENBUS_SENTINELS`` (empty: the queue's Redis is ``REDIS_URL`` itself)."""
        return [] if self.sentinels is None else parse_sentinels(self.sentinels)

    @property
    def streams_apart(self) -> bool:
        """The streams live on a deployment of their own (``TOKENBUS_STREAMS_URL``)."""
        return self.streams_url is not None

    @property
    def offline(self) -> bool:
        """No model endpoint configured: the example graph talks to the built-in offline model."""
        return self.openai_api_key is None and self.openai_base_url is None


REDIS_URL_FORMS = "redis://[user:password@]host[:port][/db], rediss://... (TLS) or unix:///path/to/redis.sock"


def parse_sentinels(value: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` as addresses; ``ValueError`` saying what is wrong."""
    addresses = []
    for part in value.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"not a list of Sentinels: {part.strip()!r}; use host:port,host:port (26379 is the usual port)"
            )
        addresses.append((host.strip("[]"), int(port)))
    return addresses


def check_redis_url(url: str) -> None:
    """Raise ``ValueError`` saying what is wrong with ``url`` if redis-py and arq cannot both use it."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises for a port that is not a number in range
    except ValueError as e:
        raise ValueError(f"not a Redis URL ({e}); use {REDIS_URL_FORMS}") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"not a Redis URL (scheme {parts.scheme or 'missing'!r}); use {REDIS_URL_FORMS}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"a unix:// URL needs the socket's path; use {REDIS_URL_FORMS}")
        return
    if not parts.hostname:
        raise ValueError(f"no host in the URL; use {REDIS_URL_FORMS}")
    db = parse_qs(parts.query).get("db", [parts.path.lstrip("/")])[0]
    if db and not db.isdigit():
        raise ValueError(f"the database must be a number, not {db!r}; use {REDIS_URL_FORMS}")
