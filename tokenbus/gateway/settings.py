"""The gateway's own configuration (``TOKENBUS_GATEWAY_*``), read once by ``tokenbus serve``."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    """Every environment variable the gateway reads besides the common ones (``REDIS_URL``,
    ``TOKENBUS_PREFIX``, ``TOKENBUS_QUEUE``). The README's gateway table mirrors this."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True, env_ignore_empty=True)

    api_keys_csv: SecretStr | None = Field(default=None, validation_alias="TOKENBUS_GATEWAY_API_KEYS")
    """Comma-separated API keys. None: the gateway serves loopback clients only."""
    token_secret: SecretStr | None = Field(default=None, validation_alias="TOKENBUS_GATEWAY_TOKEN_SECRET")
    """Signs subscribe tokens; default: derived from the API keys, so every gateway with the same
    keys accepts the others' tokens."""
    token_ttl_s: int = Field(default=3600, ge=1, le=7 * 86_400, validation_alias="TOKENBUS_GATEWAY_TOKEN_TTL")
    heartbeat_s: float = Field(default=15.0, gt=0, validation_alias="TOKENBUS_GATEWAY_HEARTBEAT")
    send_timeout_s: float = Field(default=30.0, gt=0, validation_alias="TOKENBUS_GATEWAY_SEND_TIMEOUT")
    window: int = Field(default=2048, ge=16, validation_alias="TOKENBUS_GATEWAY_WINDOW")
    """Newest entries kept per followed stream, shared by its clients: also how far a client may
    fall behind the newest entry before it is disconnected (it resumes by Last-Event-ID)."""
    retry_ms: int = Field(default=1000, ge=0, validation_alias="TOKENBUS_GATEWAY_RETRY_MS")
    """The reconnect delay sent to EventSource clients."""

    @property
    def api_keys(self) -> tuple[str, ...]:
        raw = self.api_keys_csv.get_secret_value() if self.api_keys_csv else ""
        return tuple(key for key in (part.strip() for part in raw.split(",")) if key)
