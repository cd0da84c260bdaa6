"""The HTTP/SSE gateway (``tokenbus serve``): jobs and their tokens for browsers and other HTTP clients."""

from tokenbus.gateway.app import create_app
from tokenbus.gateway.settings import GatewaySettings

__all__ = ["GatewaySettings", "create_app"]
