"""All configuration, read once from the environment at the entry point and passed down."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.keys import StreamKeys


class Settings(BaseSettings):
    """Every environment variable tokenbus reads. The README's configuration table mirrors this."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True, env_ignore_empty=True)

    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
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

    job_timeout_s: float = Field(default=300.0, gt=0, validation_alias="TOKENBUS_JOB_TIMEOUT")
    max_job_timeout_s: float = Field(default=900.0, gt=0, validation_alias="TOKENBUS_MAX_JOB_TIMEOUT")
    max_jobs: int = Field(default=50, ge=1, validation_alias="TOKENBUS_MAX_JOBS")
    poll_delay_s: float = Field(default=0.05, gt=0, validation_alias="TOKENBUS_POLL_DELAY")
    max_tries: int = Field(default=5, ge=1, validation_alias="TOKENBUS_MAX_TRIES")
    shutdown_grace_s: int = Field(default=30, ge=0, validation_alias="TOKENBUS_SHUTDOWN_GRACE")
    in_progress_margin_s: float = Field(default=10.0, gt=0, validation_alias="TOKENBUS_IN_PROGRESS_MARGIN")
    heartbeat_s: float = Field(default=5.0, gt=0, validation_alias="TOKENBUS_HEARTBEAT")
    max_request_bytes: int = Field(default=1 << 20, ge=1024, validation_alias="TOKENBUS_MAX_REQUEST_BYTES")

    publish_batch_max: int = Field(default=4096, ge=1, validation_alias="TOKENBUS_PUBLISH_BATCH")
    publish_buffer_max: int = Field(default=100_000, ge=1, validation_alias="TOKENBUS_PUBLISH_BUFFER")
    publish_give_up_s: float = Field(default=30.0, gt=0, validation_alias="TOKENBUS_PUBLISH_GIVE_UP")

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        StreamKeys(value)
        return value

    @property
    def keys(self) -> StreamKeys:
        return StreamKeys(self.prefix)

    @property
    def offline(self) -> bool:
        """No model endpoint configured: the example graph talks to the built-in offline model."""
        return self.openai_api_key is None and self.openai_base_url is None
