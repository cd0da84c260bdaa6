"""What redis-py raises when Redis cannot be reached: the errors every reader and writer retries."""

from __future__ import annotations

from redis import exceptions as redis_errors

REDIS_UNAVAILABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)
"""What redis-py raises when Redis cannot be reached or did not answer: retry later, on a new connection."""
