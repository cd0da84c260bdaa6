"""``tokenbus demo`` on embedded defaults: no REDIS_URL, no API key."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.support import JOKE, POEM, Process
from tokenbus.worker.offline_model import tokenize

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("redis", ["server", "fake"])
async def test_demo_shows_joke_and_poem_tokens_by_tag(redis: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENBUS_", "OPENAI_", "REDIS_URL"))}
    env["TOKENBUS_OFFLINE_TOKENS_PER_S"] = "0"  # unpaced: the test needs no wall-clock realism
    demo = await Process.start("demo", "--redis", redis, env=env, name="demo")
    assert await demo.wait(within=120) == 0, demo.output
    assert not [line for line in demo.stderr if " ERROR " in line], demo.output  # nothing failed on the way
    out = "\n".join(demo.stdout)
    kind = "redis-server" if redis == "server" else "embedded fakeredis"
    assert f"Redis: a private {kind}" in out
    assert "via the built-in offline model" in out
    poem = "|".join(tokenize(POEM)) + "|"
    joke = "|".join(tokenize(JOKE)) + "|"
    for mode in ("messages mode", "custom mode"):
        section = out.split(f"=== {mode}")[1].split("\n=== ")[0].split("\nWhat the streams hold")[0]
        printed = {"joke": "", "poem": ""}  # each consumer prints under its label whenever it has tokens
        parts = re.split(r"\n?\[(joke|poem) consumer\] ", section)[1:]
        for label, text in zip(parts[::2], parts[1::2], strict=True):
            printed[label] += text
        assert printed["joke"].strip() == joke.strip()
        assert printed["poem"].strip() == poem.strip()
    assert "XLEN tokenbus:tag:{poem} = 148" in out


async def test_an_application_with_its_own_schemas_worker_and_consumer_modules_does_not_shadow_tokenbus(
    tmp_path: Path,
) -> None:
    """Run from a project directory on the import path (as uvicorn and celery put it) that holds a
    ``schemas.py``, ``worker.py`` and ``consumer.py`` of its own: tokenbus imports none of them."""
    for name in ("schemas", "worker", "consumer"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the application\\'s own {name}.py was imported')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENBUS_", "OPENAI_", "REDIS_URL"))}
    env |= {"TOKENBUS_OFFLINE_TOKENS_PER_S": "0", "PYTHONPATH": str(tmp_path)}
    demo = await Process.start("demo", "--redis", "fake", env=env, name="demo", cwd=tmp_path)
    assert await demo.wait(within=120) == 0, demo.output
    assert "XLEN tokenbus:tag:{poem} = 148" in "\n".join(demo.stdout)
