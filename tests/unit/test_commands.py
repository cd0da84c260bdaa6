"""A command that cannot run as asked says why in one line and exits 2 (``CommandError``)."""

from __future__ import annotations

import builtins
import sys
from typing import Any

import pytest

from tokenbus import cli


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """``tokenbus ARGS`` in this process: its exit status, stdout and stderr."""
    monkeypatch.setattr(cli, "configure_logging", lambda *_: None)  # the test run's logging stays as it is
    monkeypatch.setattr(sys, "path", list(sys.path))  # `worker` puts its --app-dir on it

    def run(*args: str) -> tuple[int, str, str]:
        status = cli.main(list(args))
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.mark.parametrize(
    ("command", "imported", "missing", "extra"),
    [
        ("worker", "tokenbus.worker.app", "langgraph", "worker"),
        ("demo", "tokenbus.demo", "fakeredis", "demo"),
        ("serve", "uvicorn", "uvicorn", "gateway"),
    ],
)
def test_a_command_whose_extra_is_not_installed_names_it_in_one_line(
    command: str, imported: str, missing: str, extra: str, run_cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a base install: the command's first import of its extra finds no ``missing`` module."""
    real_import = builtins.__import__

    def without_the_extra(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == imported:
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_the_extra)
    status, out, err = run_cli(command)
    assert (status, out) == (2, "")
    assert err == f"tokenbus: this command needs {missing}: pip install 'tokenbus[{extra}]'\n"
