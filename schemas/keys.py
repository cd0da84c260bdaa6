"""Stream key names (contract v1) and the validation that keeps them inside the prefix."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenbus.schemas.errors import InvalidJobId, InvalidTag

_TAG_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Job ids become part of a key too; the same alphabet keeps them out of other keys' namespaces.
_JOB_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_PREFIX_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")

DEFAULT_PREFIX = "tokenbus"
FINISHED_KEPT = 1000
"""How many of the newest finished jobs ``<prefix>:finished`` keeps."""


def validate_tag(tag: object) -> str:
    """Return ``tag`` if the contract allows it, else raise :class:`InvalidTag` saying why."""
    if not isinstance(tag, str):
        raise InvalidTag(tag, f"tags are strings, not {type(tag).__name__}")
    if not _TAG_RE.fullmatch(tag):
        if not tag:
            reason = "tags are 1 to 128 characters"
        elif len(tag) > 128:
            reason = f"tags are at most 128 characters, this one has {len(tag)}"
        else:
            bad = sorted({c for c in tag if not re.fullmatch(r"[A-Za-z0-9._:-]", c)})
            reason = f"characters {''.join(bad)!r} are not allowed; use letters, digits and . _ : -"
        raise InvalidTag(tag, reason)
    return tag


def validate_job_id(job_id: object) -> str:
    if not is_valid_job_id(job_id):
        raise InvalidJobId(job_id, "job ids are 1 to 128 characters of letters, digits and . _ : -")
    return job_id  # type: ignore[return-value]  # a str, as is_valid_job_id checked


def is_valid_job_id(job_id: object) -> bool:
    return isinstance(job_id, str) and _JOB_ID_RE.fullmatch(job_id) is not None


def wake_channel(queue_name: str) -> str:
    """The Pub/Sub channel on which enqueuers announce a new job to the workers of ``queue_name``."""
    return f"{queue_name}:wake"


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """Builds the stream keys of one deployment (one prefix)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise ValueError(f"invalid prefix {self.prefix!r}: 1 to 64 characters of letters, digits and . _ -")

    def tag(self, tag: str) -> str:
        return f"{self.prefix}:tag:{{{validate_tag(tag)}}}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{{{validate_job_id(job_id)}}}"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def running(self) -> str:
        """The sorted set of running jobs, scored by their last heartbeat (ms)."""
        return f"{self.prefix}:running"

    @property
    def finished(self) -> str:
        """The sorted set of the newest finished jobs (``FINISHED_KEPT``), scored by their end (ms)."""
        return f"{self.prefix}:finished"

    @property
    def workers(self) -> str:
        """The hash of workers (id → JSON of what each serves), refreshed every heartbeat."""
        return f"{self.prefix}:workers"

    def copies(self, job_id: str, group: str) -> str:
        """Which copy of a multi-tag chunk consumer group ``group`` handles (a hash)."""
        return f"{self.prefix}:copies:{{{validate_job_id(job_id)}}}:{group}"

    def sweeping(self, job_id: str) -> str:
        """The sweeper's short lock on a job it closes."""
        return f"{self.prefix}:sweeping:{{{validate_job_id(job_id)}}}"
