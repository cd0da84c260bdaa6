"""Private Redis servers: a ``redis-server`` child process, or an embedded fakeredis server.

``tokenbus demo`` (with no ``REDIS_URL``) and the test suite start one on a free loopback port;
whoever starts one stops it. Nothing here ever touches a server it did not start.
"""

from __future__ import annotations

import re
import shutil
import signal
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

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the server holds its connections and reads nothing (a hung node); stop() ends it."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

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


CLUSTER_BUS_OFFSET = 10000  # a cluster node's bus listens on its port + 10000


def free_cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (+10000) is free too: below 55536."""
    for _ in range(1000):
        port = free_port()
        if port in taken or port + CLUSTER_BUS_OFFSET > 65535 or port + CLUSTER_BUS_OFFSET in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair (port, port + 10000) for a cluster node")


class RedisClusterProcesses:
    """A private Redis Cluster on 127.0.0.1: ``masters`` masters with ``replicas`` replicas each.

    Every node is a :class:`RedisServerProcess` with ``--cluster-enabled yes``; the cluster is made
    by ``redis-cli --cluster create``. ``node_timeout_ms`` is how long a master may be silent before
    its replica takes over (short, for the failover tests). Whoever starts it stops it.
    """

    kind = "redis-cluster"

    def __init__(self, *, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        taken: set[int] = set()
        self.nodes: list[RedisServerProcess] = []
        for _ in range(masters * (1 + replicas)):
            port = free_cluster_port(taken)
            taken.update((port, port + CLUSTER_BUS_OFFSET))
            args = (
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms), "--cluster-replica-validity-factor", "0",
                "--repl-diskless-sync-delay", "0",  # a replica's first sync at once, not 5 s later
            )  # fmt: skip
            self.nodes.append(RedisServerProcess(port=port, extra_args=args))
        self._replicas = replicas

    @property
    def url(self) -> str:
        """A seed node's URL (a live one: a failover test may have killed the first): a cluster
        client learns the rest from it."""
        return self.live_node().url

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise FileNotFoundError("redis-cli is not installed (apt-get install redis-tools)")
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-replicas", str(self._replicas), "--cluster-yes"],
                check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
            )  # fmt: skip
            self.wait_ready()
        except BaseException:
            self.close()
            raise

    def wait_synced(self, timeout_s: float = 60.0) -> None:
        """Until every live replica has made its first sync with its master (``master_link_status:up``):
        before that a replica holds nothing, and a failover would lose all its master wrote."""
        deadline = time.monotonic() + timeout_s
        while not all(
            b"master_link_status:up" in info
            for info in (_command(node.port, "INFO", "replication") for node in self.nodes if node.running)
            if b"role:slave" in info
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster's replicas (ports {self.ports}) did not sync within {timeout_s}s")
            time.sleep(0.05)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until every live node says ``cluster_state:ok`` and knows every node."""
        deadline = time.monotonic() + timeout_s
        while True:
            infos = [_command(node.port, "CLUSTER", "INFO") for node in self.nodes if node.running]
            known = [_command(node.port, "CLUSTER", "NODES") for node in self.nodes if node.running]
            if all(b"cluster_state:ok" in info for info in infos) and all(
                text.count(b"\n") >= len(self.nodes) for text in known
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster on ports {self.ports} was not ready within {timeout_s}s")
            time.sleep(0.05)

    def master_of(self, key: str) -> RedisServerProcess:
        """The node serving ``key``'s slot now (asked of a live node)."""
        slot = int(_command(self.live_node().port, "CLUSTER", "KEYSLOT", key))
        for node in self.nodes:
            if not node.running:
                continue
            for line in _command(node.port, "CLUSTER", "NODES").decode().splitlines():
                fields = line.split()
                if "master" not in fields[2] or "fail" in fields[2] or fields[7] != "connected":
                    continue
                for span in fields[8:]:
                    if span.startswith("["):
                        continue
                    low, _, high = span.partition("-")
                    if int(low) <= slot <= int(high or low):
                        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                        return next(n for n in self.nodes if n.port == port)
            break
        raise LookupError(f"no master serves the slot of {key!r}")

    def kill_master_of(self, key: str, *, timeout_s: float = 60.0) -> tuple[RedisServerProcess, RedisServerProcess]:
        """SIGKILL the master serving ``key`` and wait until its replica serves the slot: (old, new)."""
        return self.kill_master(self.master_of(key), key, timeout_s=timeout_s)

    def kill_master(
        self, old: RedisServerProcess, key: str, *, timeout_s: float = 60.0
    ) -> tuple[RedisServerProcess, RedisServerProcess]:
        """SIGKILL ``old``, the master serving ``key`` (paused, possibly), and wait until its
        replica serves the slot: (old, new)."""
        old.stop(kill=True)
        deadline = time.monotonic() + timeout_s
        while (new := self._serving(key)) in (old, None):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no replica took over {key!r}'s slot from port {old.port} within {timeout_s}s")
            time.sleep(0.05)
        self.wait_ready(timeout_s)
        assert new is not None
        return old, new

    def _serving(self, key: str) -> RedisServerProcess | None:
        try:
            return self.master_of(key)
        except LookupError:
            return None  # between a master's loss and its replica's promotion

    def live_node(self) -> RedisServerProcess:
        return next(node for node in self.nodes if node.running)

    def wait_replicated(self, master: RedisServerProcess, timeout_s: float = 30.0) -> None:
        """Until every replica of ``master`` has all it wrote (replication is asynchronous)."""
        wait_replicated(master, timeout_s)

    def node_id(self, node: RedisServerProcess) -> str:
        return _command(node.port, "CLUSTER", "MYID").decode()

    def slot_of(self, key: str) -> int:
        return int(_command(self.live_node().port, "CLUSTER", "KEYSLOT", key))

    def other_master(self, key: str) -> RedisServerProcess:
        """A live master that does not serve ``key``'s slot (where to move it)."""
        source = self.master_of(key)
        for node in self.nodes:
            if node is not source and node.running and b"role:master" in _command(node.port, "INFO", "replication"):
                return node
        raise LookupError("no other live master")

    def begin_migration(self, key: str, target: RedisServerProcess) -> tuple[int, RedisServerProcess]:
        """Mark ``key``'s slot ``IMPORTING`` on ``target`` and ``MIGRATING`` on its master: (slot, source).
        Keys still on the source are served there; others get ``ASK`` to ``target``."""
        slot, source = self.slot_of(key), self.master_of(key)
        _command(target.port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", self.node_id(source))
        _command(source.port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", self.node_id(target))
        return slot, source

    def migrate_keys(self, slot: int, source: RedisServerProcess, target: RedisServerProcess) -> int:
        """``MIGRATE`` every key of ``slot`` from ``source`` to ``target``; how many moved."""
        moved = 0
        while True:
            keys = [key.decode() for key in _reply(source.port, "CLUSTER", "GETKEYSINSLOT", str(slot), "100")]
            if not keys:
                return moved
            _command(source.port, "MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", *keys)
            moved += len(keys)

    def end_migration(self, slot: int, target: RedisServerProcess) -> None:
        """Give ``slot`` to ``target`` on every live master (the source then answers ``MOVED``)."""
        target_id = self.node_id(target)
        _command(target.port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        for node in self.nodes:
            if node is not target and node.running and b"role:master" in _command(node.port, "INFO", "replication"):
                _command(node.port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        self.wait_ready()

    def close(self) -> None:
        for node in self.nodes:
            node.close()


class RedisSentinelProcesses:
    """A private Redis master with one replica, watched by ``sentinels`` Redis Sentinels, on
    127.0.0.1. ``down_after_ms`` is how long the master may be silent before the Sentinels
    promote its replica (short, for the failover tests). Whoever starts it stops it."""

    kind = "redis-sentinel"

    def __init__(
        self,
        *,
        sentinels: int = 1,
        master_name: str = "mymaster",
        down_after_ms: int = 1000,
        sentinel_password: str | None = None,
    ) -> None:
        self.master_name = master_name
        self._down_after_ms = down_after_ms
        self.sentinel_password = sentinel_password
        """What the Sentinels ask their clients for (``requirepass``); None: nothing."""
        self.master = RedisServerProcess()
        self.replica = RedisServerProcess(extra_args=("--replicaof", "127.0.0.1", str(self.master.port)))
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self._dir = tempfile.TemporaryDirectory(prefix="tokenbus-sentinel-")
        self._sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def sentinels(self) -> str:
        """``host:port,...`` of the Sentinels, as ``TOKENBUS_SENTINELS`` takes them."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def start(self) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        try:
            self.master.start()
            self.replica.start()
            self._wait(lambda: b"master_link_status:up" in _command(self.replica.port, "INFO", "replication"))
            quorum = len(self.sentinel_ports) // 2 + 1
            for i, port in enumerate(self.sentinel_ports):
                config = Path(self._dir.name, f"sentinel-{i}.conf")
                config.write_text(
                    f"port {port}\nbind 127.0.0.1\ndir {self._dir.name}\n"
                    f"sentinel monitor {self.master_name} 127.0.0.1 {self.master.port} {quorum}\n"
                    f"sentinel down-after-milliseconds {self.master_name} {self._down_after_ms}\n"
                    f"sentinel failover-timeout {self.master_name} 10000\n"
                    + (f"requirepass {self.sentinel_password}\n" if self.sentinel_password else "")
                )
                self._sentinels.append(
                    subprocess.Popen(
                        [binary, str(config), "--sentinel", "--logfile", f"sentinel-{i}.log"],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=self._dir.name,
                    )
                )  # fmt: skip
            for port in self.sentinel_ports:  # each knows the replica: it can promote it
                self._wait(lambda port=port: _pings(port) and self._knows_replica(port))
        except BaseException:
            self.close()
            raise

    def _knows_replica(self, port: int) -> bool:
        replicas = _reply(port, "SENTINEL", "REPLICAS", self.master_name, password=self.sentinel_password)
        return str(self.replica.port).encode() in str(replicas).encode()

    def master_port(self) -> int:
        """The master's port as the first Sentinel names it now."""
        asked = ("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        return int(_reply(self.sentinel_ports[0], *asked, password=self.sentinel_password)[1])

    def kill_master(self, *, timeout_s: float = 60.0) -> None:
        """SIGKILL the master and wait until the Sentinels name the replica master, and it is one."""
        self.master.stop(kill=True)
        self._wait(
            lambda: (
                self.master_port() == self.replica.port
                and b"role:master" in _command(self.replica.port, "INFO", "replication")
            ),
            timeout_s,
        )

    @staticmethod
    def _wait(condition: Any, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if condition():
                    return
            except (OSError, RuntimeError):
                pass  # a node starting, or refusing for now
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Sentinel setup did not get there within {timeout_s}s")
            time.sleep(0.05)

    def close(self) -> None:
        for process in self._sentinels:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._sentinels.clear()
        self.replica.close()
        self.master.close()
        self._dir.cleanup()


def wait_replicated(master: RedisServerProcess, timeout_s: float = 30.0) -> None:
    """Until every replica of ``master`` has all it wrote (replication is asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = _command(master.port, "INFO", "replication").decode()
        info = dict(line.split(":", 1) for line in text.split() if ":" in line)
        replicas = [dict(kv.split("=") for kv in v.split(",")) for k, v in info.items() if re.fullmatch(r"slave\d+", k)]
        offset = info.get("master_repl_offset")
        if replicas and all(r.get("offset") == offset for r in replicas):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the replicas of port {master.port} did not catch up within {timeout_s}s")
        time.sleep(0.01)


def start_private_redis(*, prefer_fake: bool = False) -> RedisServerProcess | FakeRedisServer:
    """A started private Redis: ``redis-server`` when installed (unless ``prefer_fake``), else fakeredis."""
    server: RedisServerProcess | FakeRedisServer
    server = FakeRedisServer() if prefer_fake or redis_server_binary() is None else RedisServerProcess()
    server.start()
    return server


def _command(port: int, *args: str) -> bytes:
    """One command to a local node over a plain socket; the reply's payload (no type byte)."""
    reply = _reply(port, *args)
    return reply if isinstance(reply, bytes) else str(reply).encode()


def _reply(port: int, *args: str, password: str | None = None) -> Any:
    """One command to a local node over a plain socket (after ``AUTH password``, if given); its
    reply as hiredis reads it."""
    import hiredis

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        command: tuple[Any, ...] = args
        login: tuple[Any, ...] = ("AUTH", password)
        auth = hiredis.pack_command(login) if password is not None else b""
        s.sendall(auth + hiredis.pack_command(command))
        reader = hiredis.Reader()
        replies: list[Any] = []
        while len(replies) < (2 if auth else 1):
            while (reply := reader.gets()) is False:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError(f"port {port} closed the connection")
                reader.feed(chunk)
            replies.append(reply)
    if auth and isinstance(replies[0], hiredis.ReplyError):
        raise RuntimeError(f"port {port}: AUTH: {replies[0]}")
    reply = replies[-1]
    if isinstance(reply, hiredis.ReplyError):
        raise RuntimeError(f"port {port}: {' '.join(args)}: {reply}")
    return reply


def _pings(port: int) -> bool:
    """The server on ``port`` answers: ``PONG``, or ``NOAUTH`` from one started with ``--requirepass``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False
