"""Who may do what: API keys, signed subscribe tokens, and loopback-only without keys.

An API key (``Authorization: Bearer <key>``) may do everything. A subscribe token is a JWT
(HS256, PyJWT) that grants reading some jobs and tags until it expires: ``POST /jobs`` hands one
out for the new job, so a browser can follow its own job and nothing else. Tokens travel in the
``token`` query parameter too, because ``EventSource`` cannot set headers; API keys never do
(URLs end up in logs). With no key configured, nobody needs a credential and only loopback
clients are served.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

AUDIENCE = "tokenbus"
LOOPBACK_ONLY = (
    "this gateway has no API key configured and serves loopback clients only (set TOKENBUS_GATEWAY_API_KEYS)"
)
ALGORITHM = "HS256"


class Refused(Exception):
    """A request the gateway does not serve: ``status`` 401 (no or bad credential) or 403 (a
    credential that does not grant this)."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


@dataclass(frozen=True, slots=True)
class Grant:
    """What a request may read: everything, or the listed jobs and tags."""

    everything: bool = False
    jobs: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()

    def job(self, job_id: str) -> None:
        if not (self.everything or job_id in self.jobs):
            raise Refused(403, "forbidden", f"this token does not grant job {job_id}")

    def tag_streams(self, tags: Iterable[str]) -> None:
        if self.everything:
            return
        denied = sorted(set(tags) - self.tags)
        if denied:
            raise Refused(403, "forbidden", f"this token does not grant tag {', '.join(denied)}")


EVERYTHING = Grant(everything=True)


class Access:
    """Checks requests against the configured keys and signs and verifies subscribe tokens."""

    def __init__(self, api_keys: Sequence[str], *, secret: str | None = None, token_ttl_s: int = 3600) -> None:
        self._keys = [key.encode() for key in api_keys]
        self.token_ttl_s = token_ttl_s
        # The signing key is always 32 bytes (what HS256 wants, whatever the secret's length): the
        # secret's HMAC, else the keys' (every gateway with the same keys verifies the others' tokens).
        if secret:
            self._secret = hmac.new(b"tokenbus subscribe tokens", secret.encode(), "sha256").digest()
        elif api_keys:
            keys = "\n".join(sorted(api_keys)).encode()
            self._secret = hmac.new(b"tokenbus subscribe tokens", keys, "sha256").digest()
        else:
            self._secret = secrets.token_bytes(32)

    @property
    def loopback_only(self) -> bool:
        return not self._keys

    def is_key(self, credential: str) -> bool:
        given = credential.encode()
        return any(hmac.compare_digest(given, key) for key in self._keys)

    def check(self, *, client_host: str | None, bearer: str | None, token: str | None, need_key: bool) -> Grant:
        """The grant of a request: from its ``Authorization: Bearer`` value or its ``token``
        parameter. ``need_key``: only an API key will do (enqueue, cancel, minting tokens)."""
        if self.loopback_only:
            if not is_loopback(client_host):
                raise Refused(403, "forbidden", LOOPBACK_ONLY)
            return EVERYTHING
        if bearer is not None and self.is_key(bearer):
            return EVERYTHING
        if need_key:
            raise Refused(401, "unauthorized", "an API key is needed: send Authorization: Bearer <key>")
        credential = token if token is not None else bearer
        if credential is None:
            raise Refused(
                401, "unauthorized",
                "a credential is needed: an API key (Authorization: Bearer) or a subscribe token (?token=)",
            )  # fmt: skip
        return self.verify(credential)

    def issue(self, *, jobs: Iterable[str] = (), tags: Iterable[str] = (), ttl_s: int | None = None) -> tuple[str, int]:
        """A subscribe token for ``jobs`` and ``tags``, and when it expires (Unix seconds)."""
        now = int(time.time())
        expires = now + (ttl_s or self.token_ttl_s)
        claims = {"iat": now, "exp": expires, "jobs": sorted(set(jobs)), "tags": sorted(set(tags))}
        return self.sign(claims), expires

    def sign(self, claims: dict[str, Any]) -> str:
        """A token of these claims (plus the audience), signed with this gateway's key."""
        return jwt.encode({"aud": AUDIENCE, **claims}, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> Grant:
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=[ALGORITHM], audience=AUDIENCE, options={"require": ["exp"]}
            )
        except jwt.ExpiredSignatureError:
            raise Refused(401, "token_expired", "the subscribe token has expired: ask for a new one") from None
        except jwt.InvalidTokenError as e:
            raise Refused(401, "invalid_token", f"the subscribe token is not valid here: {e}") from None
        jobs, tags = claims.get("jobs", []), claims.get("tags", [])
        if not (isinstance(jobs, list) and isinstance(tags, list)):
            raise Refused(401, "invalid_token", "the subscribe token's claims are not lists of jobs and tags")
        return Grant(jobs=frozenset(map(str, jobs)), tags=frozenset(map(str, tags)))


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
