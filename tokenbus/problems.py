"""What went wrong, in one line a person can act on: settings that do not validate, and a Redis
that cannot be reached or refuses. The CLI prints these instead of a traceback (``--log-level
DEBUG`` shows the traceback too)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsError
from redis import exceptions as redis_errors
from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import RedisClusterException

from tokenbus.schemas.errors import CommandError, shown
from tokenbus.worker.redis_client import (
    REDIS_UNAVAILABLE,
    REFUSED_CREDENTIALS,
    redis_from_settings,
    redis_url,
    shown_url,
    streams_from_settings,
    streams_url,
)
from tokenbus.worker.settings import Settings

CONFIGURATION = "see the README's Configuration"
_CLIENT_REPR = re.compile(r"<redis\.[\w.]+\(.*?host=([^,]+),port=(\d+)[^>]*>\)>\)> - ")
"""A Sentinel's client as redis-py's ``MasterNotFoundError`` shows it, before that Sentinel's error."""
_JSON_EXAMPLES = {"TOKENBUS_GRAPHS": '{"name": "package.module:attribute"}'}


def settings_problem(error: ValidationError | SettingsError, model: type[BaseSettings] = Settings) -> str:
    """One line naming each environment variable that is wrong, and why."""
    if isinstance(error, SettingsError):
        found = re.search(r'field "(\w+)"', str(error))
        field = model.model_fields.get(found.group(1)) if found else None
        name = str(field.validation_alias) if field is not None else "a setting"
        cause = _one_line(str(error.__cause__ or error))
        example = _JSON_EXAMPLES.get(name)
        takes = f"; it takes JSON, e.g. {example}" if example else "; it takes JSON"
        return f"bad configuration: {name} is not valid JSON ({cause}){takes} ({CONFIGURATION})"
    problems = []
    for item in error.errors():
        message = str(item["msg"]).removeprefix("Value error, ")
        name = ".".join(str(part) for part in item["loc"])
        if not name:  # a rule over several settings: the message names them
            problems.append(message)
            continue
        problems.append(f"{name}={_shown_input(name, item.get('input'))}: {message}")
    return f"bad configuration: {'; '.join(_one_line(p) for p in problems)} ({CONFIGURATION})"


def _shown_input(name: str, value: Any) -> str:
    if isinstance(value, SecretStr) or any(word in name for word in ("KEY", "SECRET", "PASSWORD")):
        return "<hidden>"
    if name == "REDIS_URL" and isinstance(value, str):
        return repr(shown_url(value))
    return shown(value)


def redis_problem(error: BaseException, url: str, setting: str = "REDIS_URL") -> str:
    """What an error of redis-py, met on connecting to or using ``url`` (the value of ``setting``),
    means, and what to do."""
    return _redis_problem(error, url).replace("REDIS_URL", setting)


def queue_problem(error: BaseException, settings: Settings | None) -> str:
    """:func:`redis_problem` for the queue's Redis: ``REDIS_URL``, or the master that the Sentinels
    of ``TOKENBUS_SENTINELS`` name (what they say, or fail to, is theirs to explain)."""
    if settings is None:
        return redis_problem(error, "REDIS_URL")
    if settings.sentinels is not None:
        sentinels, master = settings.sentinels, settings.sentinel_master
        detail = _one_line(str(error)) or type(error).__name__
        if isinstance(error, MasterNotFoundError):  # redis-py names each Sentinel by its client's repr
            detail = _CLIENT_REPR.sub(r"\1:\2: ", detail)
            if "AuthenticationError" in detail:
                return (
                    f"the Sentinels of TOKENBUS_SENTINELS={sentinels} refused the password of "
                    f"TOKENBUS_SENTINEL_PASSWORD, or asked for one and it is unset ({detail}): set it to "
                    "the Sentinels' requirepass"
                )
            return (
                f"no Sentinel of TOKENBUS_SENTINELS={sentinels} answered with a master named {master!r} ({detail}): "
                "start them, or check TOKENBUS_SENTINELS and TOKENBUS_SENTINEL_MASTER"
            )
        if isinstance(error, redis_errors.ResponseError) and "unknown command 'SENTINEL'" in detail:
            return (
                f"TOKENBUS_SENTINELS={sentinels} names a Redis that is not a Sentinel ({detail}): give the "
                "Sentinels' host:port (26379 by default), not the Redis they watch"
            )
        return redis_problem(error, redis_url(settings)).replace(
            f"at {shown_url(redis_url(settings))}", f"at the master {master!r} of the Sentinels {sentinels}"
        )
    return redis_problem(error, redis_url(settings))


def _redis_problem(error: BaseException, url: str) -> str:
    where = shown_url(url)
    detail = _one_line(str(error)) or type(error).__name__
    if isinstance(error, REFUSED_CREDENTIALS):
        if "authentication required" in detail.lower():
            return f"Redis at {where} needs a password: give it in REDIS_URL (redis://[user]:password@host:port/db)"
        if "without any password configured" in detail:
            return f"Redis at {where} has no password set, but REDIS_URL gives one: remove it, or set one on the server"
        return (
            f"Redis at {where} refused the user and password of REDIS_URL ({detail}): check both; "
            "an ACL user must exist and be on (ACL LIST)"
        )
    if isinstance(error, redis_errors.NoPermissionError):
        return (
            f"the Redis user of REDIS_URL may not do this ({detail}): give it the rules of its role "
            "(tokenbus acl ROLE), or use a user that may"
        )
    if isinstance(error, redis_errors.ResponseError) and "DB index is out of range" in detail:
        return (
            f"Redis at {where} has no database {_database(url)} ({detail}): use a number below "
            "its 'databases' setting (16 by default) in REDIS_URL"
        )
    if isinstance(error, redis_errors.InvalidResponse):
        return f"what answers at {where} does not speak Redis ({detail}): check the host and port of REDIS_URL"
    if isinstance(error, redis_errors.TimeoutError | TimeoutError):
        return f"Redis at {where} did not answer in time ({detail}): is it overloaded, or the address wrong?"
    if isinstance(error, REDIS_UNAVAILABLE):
        return f"cannot reach Redis at {where} ({detail}): start it, or set REDIS_URL to where it runs"
    if isinstance(error, RedisClusterException):  # no node of the cluster answered, or it is no cluster
        return f"cannot use the Redis Cluster at {where} ({detail}): start it, or set REDIS_URL to one of its nodes"
    return f"Redis at {where} refused: {detail}"


def _database(url: str) -> str:
    parts = urlsplit(url)
    return parse_qs(parts.query).get("db", [parts.path.lstrip("/") or "0"])[0]


def _one_line(text: str) -> str:
    return " ".join(text.split())


class RedisProblem(CommandError):
    """Redis cannot be used with these settings; the message says why and what to do."""


async def check_redis(settings: Settings, *, wait_if_down: bool = False) -> None:
    """Connect and ``PING`` once, so that a command fails at once, in one line, on a Redis it
    cannot use. ``wait_if_down``: a Redis that is not up yet is left to the caller to wait for
    (the worker does); refused credentials, a wrong database or a non-Redis server still fail."""
    redis = redis_from_settings(settings, socket_timeout=10.0)
    try:
        await redis.ping()
    except (redis_errors.RedisError, OSError) as e:
        if wait_if_down and isinstance(e, REDIS_UNAVAILABLE) and not isinstance(e, REFUSED_CREDENTIALS):
            return
        raise RedisProblem(queue_problem(e, settings)) from e
    finally:
        await redis.aclose()
    if settings.streams_apart:
        await _check_streams(settings, wait_if_down=wait_if_down)


async def _check_streams(settings: Settings, *, wait_if_down: bool) -> None:
    """The same for the streams' deployment (``TOKENBUS_STREAMS_URL``, a cluster's seed node)."""
    streams = streams_from_settings(settings, socket_timeout=10.0)
    try:
        await streams.ping()
    except (redis_errors.RedisError, RedisClusterException, OSError) as e:
        unavailable = isinstance(e, (*REDIS_UNAVAILABLE, RedisClusterException))
        if wait_if_down and unavailable and not isinstance(e, REFUSED_CREDENTIALS):
            return
        raise RedisProblem(redis_problem(e, streams_url(settings), "TOKENBUS_STREAMS_URL")) from e
    finally:
        await streams.aclose()
