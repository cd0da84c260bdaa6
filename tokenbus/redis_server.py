"""Private Redis servers: a ``redis-server`` child process, or an embedded fakeredis server.

``tokenbus demo`` (with no ``REDIS_URL``) and the test suite start one on a free loopback port;
whoever starts one stops it. Nothing here ever touches a server it did not start.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


class RedisServerProcess:
    """A ``redis-server`` on 127.0.0.1, its data in a private directory.

    ``appendonly=True`` turns on AOF (``appendfsync``: ``always`` or ``everysec``), so that
    :meth:`restart` keeps every acknowledged write (used by the fault tests).
    """

    kind = "redis-server"

    def __init__(
        self,
        *,
        port: int | None = None,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        extra_args: tuple[str, ...] = (),
        binary: str | None = None,
    ) -> None:
        binary = binary or redis_server_binary()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self._binary = binary
        self.port = port or free_port()
        self._appendonly = appendonly
        self._appendfsync = appendfsync
        self._extra_args = extra_args
        self._dir = tempfile.TemporaryDirectory(prefix="tokenbus-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self._dir.name,
            "--save", "", "--appendonly", "yes" if self._appendonly else "no",
            "--appendfsync", self._appendfsync, "--daemonize", "no", "--logfile", "redis.log",
            *self._extra_args,
        ]  # fmt: skip
        self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _pings(self.port):
            if self._process.poll() is not None:
                log = Path(self._dir.name, "redis.log")
                detail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited with {self._process.returncode}: {detail}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server did not answer on port {self.port} within {START_TIMEOUT_S}s")
            time.sleep(0.01)

    def stop(self, *, kill: bool = False) -> None:
        if self._process is None:
            return
        if kill:
            self._process.kill()
        else:
            self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def restart(self, *, kill: bool = True) -> None:
        """Stop (SIGKILL by default: a crash) and start again on the same port and data."""
        self.stop(kill=kill)
        self.start()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


class FakeRedisServer:
    """fakeredis served over TCP in a thread: the fallback when ``redis-server`` is not installed."""

    kind = "embedded fakeredis"

    def __init__(self, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import fakeredis

        from tokenbus.worker._arq import tolerate_missing_info

        tolerate_missing_info()
        self._server = fakeredis.TcpFakeServer(("127.0.0.1", self.port), server_type="redis", server_version=(7, 0))
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakeredis", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def close(self) -> None:
        self.stop()


def start_private_redis(*, prefer_fake: bool = False) -> RedisServerProcess | FakeRedisServer:
    """A started private Redis: ``redis-server`` when installed (unless ``prefer_fake``), else fakeredis."""
    server: RedisServerProcess | FakeRedisServer
    server = FakeRedisServer() if prefer_fake or redis_server_binary() is None else RedisServerProcess()
    server.start()
    return server


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False
