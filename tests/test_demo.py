"""``tokenbus demo`` on embedded defaults: no REDIS_URL, no API key."""

from __future__ import annotations

import os
import re

import pytest

from tests.support import Process
from tokenbus.offline_model import script_for, tokenize

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("redis", ["server", "fake"])
async def test_demo_shows_joke_and_poem_tokens_by_tag(redis: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENBUS_", "OPENAI_", "REDIS_URL"))}
    env["TOKENBUS_OFFLINE_TOKENS_PER_S"] = "0"  # unpaced: the test needs no wall-clock realism
    demo = await Process.start("demo", "--redis", redis, env=env, name="demo")
    assert await demo.wait(within=120) == 0, demo.output
    out = "\n".join(demo.stdout)
    kind = "redis-server" if redis == "server" else "embedded fakeredis"
    assert f"Redis: a private {kind}" in out
    assert "via the built-in offline model" in out
    poem = "|".join(tokenize(script_for("Write a short poem about cats"))) + "|"
    joke = "|".join(tokenize(script_for("Write a joke about cats"))) + "|"
    for mode in ("messages mode", "custom mode"):
        section = out.split(f"=== {mode}")[1].split("\n=== ")[0].split("\nWhat the streams hold")[0]
        printed = {"joke": "", "poem": ""}  # each consumer prints under its label whenever it has tokens
        parts = re.split(r"\n?\[(joke|poem) consumer\] ", section)[1:]
        for label, text in zip(parts[::2], parts[1::2], strict=True):
            printed[label] += text
        assert printed["joke"].strip() == joke.strip()
        assert printed["poem"].strip() == poem.strip()
    assert "XLEN tokenbus:tag:{poem} = 148" in out
