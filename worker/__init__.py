"""The producing side: enqueue jobs (:class:`TokenbusClient`, light), and run them (the arq worker,
graph registry, emitter, publisher: ``tokenbus.worker.app``, which needs ``tokenbus[worker]``).

This package's own names load no LangGraph, LangChain or openai: a service that only enqueues
imports ``from tokenbus.worker import TokenbusClient, Settings``.
"""

from tokenbus.worker.client import TokenbusClient
from tokenbus.worker.settings import Settings

__all__ = ["Settings", "TokenbusClient"]
