"""The configured linters pass: ruff (lint and format) and mypy --strict on the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]],
    ids=["ruff", "ruff-format", "mypy"],
)
def test_linter_passes(command: list[str]) -> None:
    tool = str(BIN / command[0])
    result = subprocess.run([tool, *command[1:]], check=False, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_documents_every_setting() -> None:
    from tokenbus.worker.settings import Settings

    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    missing = [
        str(f.validation_alias) for f in Settings.model_fields.values() if f"`{f.validation_alias}`" not in table
    ]
    assert not missing, f"README's configuration table lacks {missing}"


def test_readme_documents_every_gateway_setting() -> None:
    from tokenbus.gateway.settings import GatewaySettings

    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Browser", 1)[1].split("\n## ", 1)[0]
    fields = GatewaySettings.model_fields.values()
    missing = [str(f.validation_alias) for f in fields if f"`{f.validation_alias}`" not in table]
    assert not missing, f"README's gateway table lacks {missing}"


def test_readme_documents_every_command() -> None:
    from tokenbus.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    missing = [name for name in commands or () if f"tokenbus {name}" not in readme]
    assert not missing, f"README shows no `tokenbus COMMAND` for {missing}"
