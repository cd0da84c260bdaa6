"""ACL roles: the ``ACL SETUSER`` rules that let each part of tokenbus do its work and nothing else.

Each role lists the commands it sends, the keys it touches (read ``%R~``, write ``%W~`` or both
``~``, Redis 7.0's key permissions) and the Pub/Sub channels it uses (``&``), as found in the
code that runs under it:

- **worker** (``worker/app.py`` on arq, ``worker/publisher.py``, ``worker/orphans.py``,
  ``worker/metrics.py``): arq's job, in-progress, retry and result keys and its abort set, the
  queue and its health-check key, the ``<queue>:wake`` channel, ``INFO``/``DBSIZE`` (arq logs them
  at start); appends to job and tag streams, reads job streams back (the sweeper),
  ``<prefix>:running``, ``<prefix>:sweeping:*``, ``<prefix>:finished`` and its record in
  ``<prefix>:workers``; ``ZCOUNT``/``ZCARD`` of the queue and ``<prefix>:running`` (the metrics'
  queue depth);
  ``EVAL``/``EVALSHA`` of the lease scripts (:mod:`tokenbus.worker.lease`), whose commands Redis checks
  against the same rules.
- **enqueuer** (``worker/client.py``): arq's ``WATCH``/``MULTI`` enqueue of ``arq:job:<id>`` onto the
  queue, ``PUBLISH`` on the wake channel, ``ZADD arq:abort``, reading job streams
  (``--follow``, ``abort(timeout_s=...)``, ``consumer.jobs.job_result``) and ``<prefix>:workers``
  (the graphs live workers serve).
- **reader** of given tags (``consumer/``): ``XREAD``/``XRANGE``/``XREVRANGE``/``XINFO`` on those tag
  streams only; no job streams, which hold every tag's tokens. With ``groups``, consumer groups too:
  the group commands on those streams, ``XADD`` to ``<prefix>:dead`` only and the group's copy
  claims under ``<prefix>:copies:*`` (selectors).
- **gateway** (``tokenbus serve``): the enqueuer's rules, reading tag streams (all, or the given
  ones), ``EXISTS`` of arq's in-progress keys (a job's status), ``TYPE`` (which followed key is not
  a stream) and ``CLIENT ID``/``CLIENT UNBLOCK`` (its stream hub wakes its own blocked ``XREAD``).

No role may write a stream it only reads, nor run ``KEYS``, ``FLUSHALL``, ``CONFIG`` or any
command not listed. Users are (re)created from scratch (``reset``), with the password's SHA-256
(``#<hex>``), so the printed rules hold no password.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from arq.constants import (
    abort_jobs_ss,
    health_check_key_suffix,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)

from tokenbus.schemas.errors import CommandError
from tokenbus.schemas.keys import StreamKeys, validate_tag, wake_channel

ROLES = ("worker", "enqueuer", "reader", "gateway")

_USER_RE = re.compile(r"[A-Za-z0-9._@-]{1,128}")  # no ':' (REDIS_URL's user:password) and nothing to quote
_ACL_SPACES = " \t\n\v\f\r\x00"  # what Redis's ACLStringHasSpaces refuses in a pattern
_GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")
_BARE_ARG = re.compile(r"[\x21\x23-\x26\x28-\x7e]+")  # printable ASCII but space and quotes: no quoting in redis-cli

# Every client: health checks (redis-py, arq's create_pool) and a database number in REDIS_URL.
# AUTH and HELLO need no permission.
_CONNECTION = ("+ping", "+select")
# redis-py's transactions: WATCH ... MULTI ... EXEC, and UNWATCH/DISCARD when they end early.
_TRANSACTIONS = ("+multi", "+exec", "+discard", "+watch", "+unwatch")
_READ_STREAMS = ("+xread", "+xrange", "+xrevrange", "+xinfo")
# consumer.groups.GroupConsumer: never XADD, XDEL, XTRIM or XGROUP DESTROY/SETID on the tag streams.
_GROUP_COMMANDS = ("+xreadgroup", "+xack", "+xgroup|create", "+xpending", "+xclaim")


@dataclass(frozen=True)
class AclRequest:
    """What to build: a role, its user and password, and for readers the tag streams."""

    role: str
    user: str
    password: str
    tags: tuple[str, ...] = ()
    groups: bool = False


def glob_escape(text: str) -> str:
    """``text`` as a literal ACL key or channel pattern (Redis matches them as globs, and refuses
    patterns holding whitespace)."""
    if any(c in _ACL_SPACES for c in text):
        raise CommandError(f"{text!r} holds whitespace, which Redis ACL patterns cannot: choose another name")
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def redis_cli_quote(arg: str) -> str:
    """``arg`` as one argument on a line read by ``redis-cli`` (its ``sdssplitargs``)."""
    if _BARE_ARG.fullmatch(arg):
        return arg
    out = []
    for byte in arg.encode():
        char = chr(byte)
        if char in '\\"':
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


def generate_password() -> str:
    """A random password that can stand in a ``REDIS_URL`` as it is."""
    return secrets.token_urlsafe(32)


def default_user(role: str) -> str:
    return f"tokenbus-{role}"


def role_rules(
    role: str, *, keys: StreamKeys, queue_name: str, tags: Sequence[str] = (), groups: bool = False
) -> list[str]:
    """The ACL rules of ``role`` (no user, password or ``reset``), in the order they are printed."""
    if role not in ROLES:
        raise CommandError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    if tags and role not in ("reader", "gateway"):
        raise CommandError(f"the {role} role reads no tag streams: --tag is for reader and gateway")
    if groups and role not in ("reader", "gateway"):
        raise CommandError(f"the {role} role reads no tag streams: --groups is for reader and gateway")
    if role == "reader" and not tags:
        raise CommandError("the reader role needs the tags it may read: give --tag (repeatable)")
    tags = [validate_tag(t) for t in dict.fromkeys(tags)]
    if role == "worker":
        return _worker(keys, queue_name)
    if role == "enqueuer":
        return _enqueuer(keys, queue_name)
    readers = _tag_reader(keys, tags, groups)
    if role == "reader":
        return [*_CONNECTION, *readers]
    return _merge(_enqueuer(keys, queue_name), readers, _GATEWAY)


_GATEWAY = ("+type", "+client|id", "+client|unblock", f"%R~{glob_escape(in_progress_key_prefix)}*")


def _worker(keys: StreamKeys, queue_name: str) -> list[str]:
    queue = glob_escape(queue_name)
    prefix = glob_escape(keys.prefix)
    commands = (
        *_CONNECTION, *_TRANSACTIONS,
        "+info", "+dbsize",  # arq logs them at start
        # arq's jobs: GET the job, INCRBY (redis-py's incr)/EXPIRE/SETEX its try count, SET NX PX/PSETEX/PEXPIRE/EXISTS
        # its in-progress key, SET its result, DEL them when it ends; PSETEX/DEL the health check
        "+get", "+set", "+psetex", "+setex", "+incrby", "+expire", "+pexpire", "+exists", "+del",
        # arq's queue and abort set; tokenbus's <prefix>:running heartbeats and <prefix>:finished; ZCOUNT: the
        # metrics' queue depth
        "+zadd", "+zrem", "+zincrby", "+zscore", "+zcard", "+zcount", "+zrange", "+zrangebyscore", "+zremrangebyscore",
        "+zremrangebyrank",
        "+hset", "+hdel", "+hgetall",  # the worker's record in <prefix>:workers
        "+xadd", "+xrevrange",  # publishing; each attempt and the sweeper read a job's last entry back
        "+wait",  # TOKENBUS_WAIT_REPLICAS: each publish pipeline waits for its replicas
        "+subscribe", "+unsubscribe",  # wake-ups
        # leases (worker/lease.py): compare-and-set scripts, run with this user's rights on the keys above
        "+eval", "+evalsha", "+script|load", "+script|exists",
    )  # fmt: skip
    key_patterns = (
        f"~{glob_escape(job_key_prefix)}*",
        f"~{glob_escape(in_progress_key_prefix)}*",
        f"~{glob_escape(retry_key_prefix)}*",
        f"~{glob_escape(result_key_prefix)}*",  # written; but keys given to a script need read and write
        f"~{glob_escape(abort_jobs_ss)}",
        f"~{queue}",
        f"%W~{queue}{glob_escape(health_check_key_suffix)}",
        f"~{prefix}:job:*",
        f"%W~{prefix}:tag:*",
        f"~{glob_escape(keys.running)}",
        f"%W~{prefix}:sweeping:*",
        f"~{glob_escape(keys.finished)}",
        f"~{glob_escape(keys.workers)}",
    )
    return [*commands, *key_patterns, f"&{glob_escape(wake_channel(queue_name))}"]


def _enqueuer(keys: StreamKeys, queue_name: str) -> list[str]:
    commands = (
        *_CONNECTION, *_TRANSACTIONS,
        "+exists", "+psetex", "+zadd",  # arq's enqueue_job; ZADD arq:abort to abort
        "+publish",  # the wake-up
        *_READ_STREAMS,  # job streams: --follow, job_result, abort(timeout_s=...)
        "+hgetall",  # <prefix>:workers: which graphs live workers serve (an unknown graph is refused)
    )  # fmt: skip
    key_patterns = (
        f"~{glob_escape(job_key_prefix)}*",  # WATCHed, then written; an existing id is not enqueued twice
        f"%R~{glob_escape(result_key_prefix)}*",  # ... nor one whose result is kept
        f"%W~{glob_escape(queue_name)}",
        f"%W~{glob_escape(abort_jobs_ss)}",
        f"%R~{glob_escape(keys.prefix)}:job:*",
        f"%R~{glob_escape(keys.workers)}",
    )
    return [*commands, *key_patterns, f"&{glob_escape(wake_channel(queue_name))}"]


def _tag_reader(keys: StreamKeys, tags: Sequence[str], groups: bool) -> list[str]:
    """Reading ``tags`` (all tag streams when empty); with ``groups``, through consumer groups,
    whose commands write the group's state on the stream (so ``~``, not ``%R~``), but none that
    adds or removes entries; poison entries go to the dead-letter stream through a selector that
    may only ``XADD`` there."""
    patterns = [glob_escape(keys.tag(t)) for t in tags] or [f"{glob_escape(keys.prefix)}:tag:*"]
    if not groups:
        return [*_READ_STREAMS, *(f"%R~{p}" for p in patterns)]
    dead_letter = f"(+xadd %W~{glob_escape(keys.dead_letter)})"
    # which consumer of a group handles a chunk that two of its tag streams hold (consumer/groups.py)
    copies = f"(+hsetnx +hget +expire ~{glob_escape(keys.prefix)}:copies:*)"
    commands = (*_READ_STREAMS, *_GROUP_COMMANDS, "+multi", "+exec", "+discard")
    return [*commands, *(f"~{p}" for p in patterns), dead_letter, copies]


def _merge(*rule_lists: Iterable[str]) -> list[str]:
    """Rule lists joined in order, each rule once."""
    return list(dict.fromkeys(rule for rules in rule_lists for rule in rules))


def password_hash(password: str) -> str:
    """The ``#<sha256 hex>`` rule: Redis stores only this hash of a password anyway."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def setuser_command(request: AclRequest, *, keys: StreamKeys, queue_name: str) -> list[str]:
    """``ACL SETUSER`` with every argument of ``request``'s user."""
    if not _USER_RE.fullmatch(request.user):
        raise CommandError(f"invalid user name {request.user!r}: 1 to 128 characters of letters, digits and . _ @ -")
    if not request.password:
        raise CommandError("the password is empty")
    rules = role_rules(request.role, keys=keys, queue_name=queue_name, tags=request.tags, groups=request.groups)
    return ["ACL", "SETUSER", request.user, "reset", "on", password_hash(request.password), *rules]


def command_line(args: Sequence[str]) -> str:
    """``args`` as one line to pipe into ``redis-cli``."""
    return " ".join(redis_cli_quote(arg) for arg in args)
