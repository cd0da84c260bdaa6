"""The reading side: subscribe to tag and job streams, fold a job's output, consumer groups.

Needs only a Redis client and a key prefix; loads no LangGraph, LangChain or openai.
"""

from tokenbus.consumer.attempts import AttemptFilter, Restart
from tokenbus.consumer.groups import GroupConsumer, GroupStats, group_stats
from tokenbus.consumer.jobs import JobView, job_result
from tokenbus.consumer.reader import BEGINNING, LATEST, Gap, StreamReader, latest_positions
from tokenbus.consumer.redis_errors import REDIS_UNAVAILABLE
from tokenbus.consumer.subscribe import subscribe

__all__ = [
    "BEGINNING",
    "LATEST",
    "REDIS_UNAVAILABLE",
    "AttemptFilter",
    "Gap",
    "GroupConsumer",
    "GroupStats",
    "JobView",
    "Restart",
    "StreamReader",
    "group_stats",
    "job_result",
    "latest_positions",
    "subscribe",
]
