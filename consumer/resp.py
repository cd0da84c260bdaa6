"""Commands in the Redis protocol, packed by hiredis in C.

redis-py packs each argument in Python (an encoder call per argument): for the readers' blocking
``XREAD`` of many streams, sent once per batch with every stream's key and position, that packing
was the reading loop's largest cost. Arguments are ``str``, ``bytes``, ``int`` or ``float``.
"""

from __future__ import annotations

from typing import Any

import hiredis


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in the Redis protocol."""
    packed: bytes = hiredis.pack_command(args)
    return packed
