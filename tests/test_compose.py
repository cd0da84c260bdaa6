"""docker-compose.yml and its overrides (docker-compose.cluster.yml: the streams on a Redis Cluster;
docker-compose.sentinel.yml: the queue behind Sentinel), checked as far as a machine without a
Docker engine can: their shape, that every command is a real ``tokenbus`` command and every
variable a real setting, that their services run as local processes against a private Redis, and
that the scripts their Redis services run (the cluster's one-shot init, the Sentinel nodes) do what
they say against local ``redis-server`` processes."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import yaml
from redis.asyncio import Redis, RedisCluster

from tests.sse import free_port
from tests.support import POEM, Process, settings_env, wait_for, wait_until
from tokenbus.cli import build_parser
from tokenbus.gateway import GatewaySettings
from tokenbus.redis_server import CLUSTER_BUS_OFFSET, RedisServerProcess, free_cluster_port
from tokenbus.schemas.entries import Entry
from tokenbus.schemas.keys import StreamKeys
from tokenbus.worker.settings import Settings

ROOT = Path(__file__).parent.parent
COMPOSE = ROOT / "docker-compose.yml"
OVERRIDES = {"cluster": ROOT / "docker-compose.cluster.yml", "sentinel": ROOT / "docker-compose.sentinel.yml"}
VARIANTS = {
    "single": (),
    "cluster": ("cluster",),
    "sentinel": ("sentinel",),
    "sentinel+cluster": ("sentinel", "cluster"),
}
"""Each way README "Scaling out" combines the files: ``-f docker-compose.yml [-f ...]``."""
TOKENBUS_SERVICES = ("worker", "consumer", "gateway")
SETTING_NAMES = {
    str(field.validation_alias) for model in (Settings, GatewaySettings) for field in model.model_fields.values()
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())  # resolves the files' <<: merge keys
    return data


def merge(base: Any, override: Any, key: str = "") -> Any:
    """Compose's merge of an override file into a base, for what these files use: mappings merge
    key by key (``environment``, ``depends_on``, ``services``...); a service's ``volumes`` merge by
    the mount's target, ``ports`` and ``expose`` join; any other list or value (``command``, a
    healthcheck's ``test``) is replaced. test_overrides_use_only_what_merge_reads keeps it so."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for k, v in override.items():
            merged[k] = merge(base[k], v, k) if k in base else v
        return merged
    if isinstance(base, list) and isinstance(override, list):
        if key == "volumes":
            targets = {entry.split(":")[1] for entry in override}
            return [entry for entry in base if entry.split(":")[1] not in targets] + override
        if key in ("ports", "expose"):
            return base + override
    return override


def compose_of(variant: str) -> dict[str, Any]:
    data = load(COMPOSE)
    for name in VARIANTS[variant]:
        data = merge(data, load(OVERRIDES[name]))
    return data


def resolve(value: str, overrides: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}``: our overrides stand in for the operator's environment."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: overrides.get(m[1], m[2]), str(value))


def test_redis_persists_and_reports_health(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"][-1] == "ping"
    assert any(v.endswith(":/data") for v in redis["volumes"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("service", TOKENBUS_SERVICES)
def test_services_run_real_commands_with_real_settings(variant: str, service: str) -> None:
    spec = compose_of(variant)["services"][service]
    command = spec["command"]
    assert command[0] == "tokenbus"
    build_parser().parse_args(command[1:])  # exits on an unknown command or option
    unknown = set(spec["environment"]) - SETTING_NAMES
    assert not unknown, f"{service} sets variables tokenbus does not read: {unknown}"
    assert spec["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "container_name" not in spec
    if service != "gateway":
        assert "ports" not in spec  # so that --scale works


@pytest.mark.e2e
async def test_the_gateway_service_serves_and_its_healthcheck_passes(
    compose: dict[str, Any], settings: Settings
) -> None:
    """The gateway's command on a free port, and its healthcheck's own command against it."""
    spec = compose["services"]["gateway"]
    published = resolve(spec["ports"][0], {})
    assert published.startswith("127.0.0.1:") and published.endswith(":8000")  # the host's loopback by default
    port = free_port()
    command = [str(port) if arg == "8000" else "127.0.0.1" if arg == "0.0.0.0" else arg for arg in spec["command"]]
    env = {
        **settings_env(settings),
        **{k: resolve(v, {}) for k, v in spec["environment"].items() if k.startswith("TOKENBUS_GATEWAY")},
    }
    gateway = await Process.start(*command[1:], env=env, name="gateway")
    try:
        await gateway.wait_line("gateway listening on")
        assert await healthcheck(spec, 8000, port) == 0
    finally:
        await gateway.stop()


async def healthcheck(spec: dict[str, Any], in_container: int, port: int) -> int:
    """Run a service's healthcheck command against ``port`` instead of its port in the container."""
    test = spec["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    check = await asyncio.create_subprocess_exec(
        sys.executable, *[a.replace(f":{in_container}/", f":{port}/") for a in test[2:]]
    )
    return await check.wait()


def test_worker_scales_and_shuts_down_gracefully(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    grace = int(resolve(worker["environment"]["TOKENBUS_SHUTDOWN_GRACE"], {}))
    assert int(worker["stop_grace_period"].rstrip("s")) > grace


@pytest.mark.e2e
async def test_services_run_as_local_processes(compose: dict[str, Any], settings: Settings) -> None:
    """Two workers (``--scale worker=2``) and the consumer, as compose would start them."""
    env = settings_env(settings)
    processes: list[Process] = []
    metrics_ports: list[int] = []

    async def start(service: str, name: str) -> Process:
        spec = compose["services"][service]
        service_env = {k: resolve(v, {}) for k, v in spec["environment"].items()}
        service_env.update({k: env[k] for k in ("REDIS_URL", "TOKENBUS_PREFIX", "TOKENBUS_QUEUE")})
        if service == "worker":
            service_env.update(OPENAI_BASE_URL=env["OPENAI_BASE_URL"], OPENAI_API_KEY=env["OPENAI_API_KEY"])
            assert service_env["TOKENBUS_METRICS_HOST"] == "0.0.0.0"  # for Prometheus, from the compose network
            metrics_ports.append(free_port())  # one machine here, a container each there
            service_env.update(TOKENBUS_METRICS_PORT=str(metrics_ports[-1]), TOKENBUS_METRICS_HOST="127.0.0.1")
        full_env = {k: v for k, v in env.items() if k not in spec["environment"]} | service_env
        proc = await Process.start(*spec["command"][1:], env=full_env, name=name)
        processes.append(proc)
        return proc

    try:
        workers = [await start("worker", f"worker-{i}") for i in range(2)]
        for w in workers:
            await w.wait_line("worker serves graphs")
        for port in metrics_ports:  # each worker's healthcheck, as compose runs it in its container
            assert await healthcheck(compose["services"]["worker"], 9100, port) == 0
        consumer = await start("consumer", "consumer")
        await consumer.wait_line("following")
        job_ids = []
        for _ in range(4):
            enqueue = await Process.start("enqueue", "joke_poem", "--input", '{"topic": "cats"}', env=env)
            assert await enqueue.wait() == 0, enqueue.output
            job_ids.append(enqueue.stdout[0])
        for job_id in job_ids:  # the consumer service prints every job's poem, then its end entry
            await consumer.wait_line(f'"type":"end","job":"{job_id}"', stream="stdout")
        entries = [orjson.loads(line) for line in consumer.stdout]
        for job_id in job_ids:
            chunks = [e for e in entries if e["job"] == job_id and e["type"] == "token"]
            assert "".join(e["content"] for e in chunks) == POEM
            assert all(e["tags"] == ["poem"] for e in chunks)
    finally:
        for proc in processes:
            await proc.stop()


def test_the_image_installs_the_versions_tested() -> None:
    """The Dockerfile installs tokenbus[worker,gateway,top] under requirements.lock: every dependency pinned."""
    root = COMPOSE.parent
    dockerfile = (root / "Dockerfile").read_text()
    assert "COPY pyproject.toml README.md LICENSE requirements.lock ./" in dockerfile
    assert "pip install -c requirements.lock '.[worker,gateway,top]'" in dockerfile
    pins = {}
    for line in (root / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    needed = [*project["dependencies"], *extras["worker"], *extras["gateway"], *extras["top"]]
    names = {re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!;~ ]", spec, maxsplit=1)[0]).lower() for spec in needed}
    assert sorted(names - pins.keys()) == []


# --- the overrides: docker-compose.cluster.yml and docker-compose.sentinel.yml ---------------------

STREAMS_SETTINGS = {str(field.validation_alias) for field in Settings.model_fields.values()}


def options(command: list[str]) -> dict[str, str]:
    """``redis-server --name value ...`` as ``{"--name": "value"}``."""
    assert command[0] == "redis-server" and len(command) % 2 == 1
    return dict(zip(command[1::2], command[2::2], strict=True))


def script_on_host(spec: dict[str, Any]) -> Path:
    """The repository's file that a service's ``sh /path`` command runs through its bind mount."""
    shell, path = spec["command"]
    assert shell == "sh"
    for volume in spec["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith("./") and path.startswith(target + "/"):
            return ROOT / str(source) / str(path).removeprefix(target + "/")
    raise AssertionError(f"{path} is not in a mount of the repository: {spec['volumes']}")


def test_overrides_use_only_what_merge_reads() -> None:
    """An override only adds to the base services what merge() merges as Compose does."""
    base = load(COMPOSE)["services"]
    for path in OVERRIDES.values():
        for name, spec in load(path)["services"].items():
            if name in base:
                assert set(spec) <= {"environment", "depends_on", "command", "volumes", "healthcheck"}, (path, name)
                for key in ("environment", "depends_on"):
                    assert isinstance(spec.get(key, {}), dict) and isinstance(base[name].get(key, {}), dict)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_names_only_what_it_declares(variant: str) -> None:
    data = compose_of(variant)
    services = data["services"]
    published = []
    for name, spec in services.items():
        assert set(spec.get("depends_on", {})) <= set(services), name
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which the repository lacks"
            else:
                assert source in data["volumes"], f"{name} uses the undeclared volume {source}"
        if spec.get("command", [""])[0] == "sh":
            assert script_on_host(spec).is_file()
        published += [resolve(port, {}).rsplit(":", 1)[0] for port in spec.get("ports", [])]
    assert len(published) == len(set(published)), f"two services publish one host port: {sorted(published)}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("service", TOKENBUS_SERVICES)
def test_each_variant_puts_the_queue_and_the_streams_where_it_says(variant: str, service: str) -> None:
    services = compose_of(variant)["services"]
    spec = services[service]
    env = {k: resolve(v, {}) for k, v in spec["environment"].items()}
    # Settings' own checks: the URLs, a cluster without a URL, the Sentinel list's form
    values: dict[str, Any] = {k: v for k, v in env.items() if k in STREAMS_SETTINGS and v != ""}
    settings = Settings(**values)
    assert settings.redis_url is not None and urlsplit(settings.redis_url).hostname == "redis"  # the queue's
    if "cluster" in variant:
        assert settings.streams_cluster and settings.streams_url is not None
        seed = urlsplit(settings.streams_url)
        nodes = services["redis-cluster-init"]["environment"]["REDIS_CLUSTER_NODES"].split()
        assert f"{seed.hostname}:{seed.port}" in nodes
        assert spec["depends_on"]["redis-cluster-init"] == {"condition": "service_completed_successfully"}
    else:
        assert settings.streams_url is None and not settings.streams_cluster  # with the queue
    if "sentinel" in variant:
        sentinels = sorted(name for name in services if name.startswith("sentinel-"))
        assert len(sentinels) >= 3  # a majority survives one loss
        expected = []
        for name in sentinels:
            sentinel_env = services[name]["environment"]
            port = int(sentinel_env.get("SENTINEL_PORT", 26379))
            assert services[name]["healthcheck"]["test"] == ["CMD", "redis-cli", "-p", str(port), "ping"]
            assert sentinel_env["SENTINEL_MASTER_NAME"] == settings.sentinel_master
            assert sentinel_env["SENTINEL_MASTER_HOST"] == "redis"
            assert int(sentinel_env["SENTINEL_QUORUM"]) > len(sentinels) // 2
            assert spec["depends_on"][name] == {"condition": "service_healthy"}
            expected.append((name, port))
        assert settings.sentinel_addresses == expected
    else:
        assert settings.sentinels is None


def test_cluster_nodes_are_the_ones_the_init_and_the_workers_name() -> None:
    services = compose_of("cluster")["services"]
    init = services["redis-cluster-init"]
    env = init["environment"]
    nodes = {name: spec for name, spec in services.items() if name.startswith("redis-node-")}
    assert len(nodes) == 3 * (1 + int(env["REDIS_CLUSTER_REPLICAS"]))  # 3 masters with their replicas
    addresses = []
    for name, spec in nodes.items():
        flags = options(spec["command"])
        port = flags["--port"]
        assert flags["--cluster-enabled"] == "yes" and flags["--appendonly"] == "yes"
        # clients are redirected to names that resolve on the compose network (README "Scaling out")
        assert flags["--cluster-announce-hostname"] == name
        assert flags["--cluster-preferred-endpoint-type"] == "hostname"
        assert spec["healthcheck"]["test"] == ["CMD", "redis-cli", "-p", port, "ping"]
        assert [resolve(p, {}) for p in spec["ports"]] == [f"127.0.0.1:{port}:{port}"]  # the same port out and in
        assert init["depends_on"][name] == {"condition": "service_healthy"}
        addresses.append(f"{name}:{port}")
    assert env["REDIS_CLUSTER_NODES"].split() == addresses
    assert init["restart"] == "no"  # one-shot: the workers wait for it to exit 0


def test_the_redis_scripts_read_what_their_services_set() -> None:
    data = compose_of("sentinel+cluster")
    for name, spec in data["services"].items():
        if spec.get("command", [""])[0] != "sh":
            continue
        text = script_on_host(spec).read_text()
        read = set(re.findall(r"\$\{(\w+)", text))
        assert set(spec.get("environment", {})) <= read, f"{name} sets variables its script does not read"
        required = set(re.findall(r"\$\{(\w+):\?", text))
        assert required <= set(spec.get("environment", {})), f"{name} lacks variables its script needs"
    redis, replica = data["services"]["redis"], data["services"]["redis-replica"]
    assert redis["environment"]["REDIS_ANNOUNCE_HOST"] == "redis" and "REDIS_REPLICA_OF" not in redis["environment"]
    assert replica["environment"] == {"REDIS_ANNOUNCE_HOST": "redis-replica", "REDIS_REPLICA_OF": "redis 6379"}
    assert any(v.endswith(":/data") for v in redis["volumes"])  # the base's AOF volume, kept


# --- the scripts, run against local redis-server processes ----------------------------------------


def cli(port: int, *args: str) -> str:
    done = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, check=True, timeout=10)
    return done.stdout.replace("\r", "")


def cluster_info(port: int) -> dict[str, str]:
    return dict(line.split(":", 1) for line in cli(port, "cluster", "info").splitlines() if ":" in line)


def topology(port: int) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """Each node's id, role, master and slots, as ``port``'s node sees them."""
    rows = []
    for line in cli(port, "cluster", "nodes").splitlines():
        node_id, _, flags, master, *rest = line.split()
        rows.append((node_id, "master" if "master" in flags else "replica", master, tuple(rest[4:])))
    return sorted(rows)


def settled(rows: list[tuple[str, str, str, tuple[str, ...]]]) -> bool:
    """3 masters serving slots, each followed by one replica."""
    masters = [row[0] for row in rows if row[1] == "master" and row[3]]
    return (
        len(rows) == 6
        and len(masters) == 3
        and sorted(row[2] for row in rows if row[1] == "replica") == sorted(masters)
    )


def assert_topology(port: int, expected: list[tuple[str, str, str, tuple[str, ...]]]) -> None:
    """``port``'s node sees ``expected`` (the same ids, roles and slots), once gossip has settled."""
    deadline = time.monotonic() + 30
    while (seen := topology(port)) != expected:
        assert time.monotonic() < deadline, f"the cluster changed: {seen} instead of {expected}"
        time.sleep(0.05)


def local_cluster_nodes() -> tuple[list[RedisServerProcess], dict[str, str]]:
    """The cluster file's nodes, each started from its own command on a free port pair, and the
    init service's environment naming them (the first by a name, as compose does, not an IP)."""
    services = compose_of("cluster")["services"]
    init_env = dict(services["redis-cluster-init"]["environment"])
    taken: set[int] = set()
    nodes: list[RedisServerProcess] = []
    addresses: list[str] = []
    for address in init_env["REDIS_CLUSTER_NODES"].split():
        name = address.split(":")[0]
        flags = options(services[name]["command"])
        del flags["--port"]
        flags["--cluster-announce-hostname"] = "127.0.0.1"  # what resolves here, as the name does there
        port = free_cluster_port(taken)
        taken.update((port, port + CLUSTER_BUS_OFFSET))
        nodes.append(RedisServerProcess(port=port, extra_args=tuple(x for pair in flags.items() for x in pair)))
        addresses.append(f"{'localhost' if not addresses else '127.0.0.1'}:{port}")
    init_env["REDIS_CLUSTER_NODES"] = " ".join(addresses)
    return nodes, init_env


def run_init(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = script_on_host(compose_of("cluster")["services"]["redis-cluster-init"])
    return subprocess.run(
        ["sh", str(script)], check=False, env={**os.environ, **env}, capture_output=True, text=True, timeout=180
    )


@pytest.fixture
def cluster_nodes() -> Iterator[tuple[list[RedisServerProcess], dict[str, str]]]:
    nodes, env = local_cluster_nodes()
    try:
        for node in nodes:
            node.start()
        yield nodes, env
    finally:
        for node in nodes:
            node.close()


def test_the_cluster_init_makes_the_cluster_once(
    cluster_nodes: tuple[list[RedisServerProcess], dict[str, str]],
) -> None:
    nodes, env = cluster_nodes
    made = run_init(env)
    assert made.returncode == 0, made.stderr
    assert "creating the cluster" in made.stderr
    for node in nodes:
        info = cluster_info(node.port)
        assert info["cluster_state"] == "ok" and info["cluster_slots_assigned"] == "16384"
        assert info["cluster_known_nodes"] == "6" and info["cluster_size"] == "3"
    # the replicas' roles reach every node by gossip, a moment after cluster_state:ok
    deadline = time.monotonic() + 30
    while not settled(made_topology := topology(nodes[0].port)):
        assert time.monotonic() < deadline, f"no 3 masters with a replica each: {made_topology}"
        time.sleep(0.05)

    again = run_init(env)  # `docker compose up` once more
    assert again.returncode == 0, again.stderr
    assert "nothing created" in again.stderr and "creating" not in again.stderr
    assert_topology(nodes[0].port, made_topology)

    for node in nodes:  # every node restarts (nodes.conf kept): the init runs while they re-form
        node.stop()
    for node in nodes:
        node.start()
    restarted = run_init(env)
    assert restarted.returncode == 0, restarted.stderr
    assert "nothing created" in restarted.stderr
    assert_topology(nodes[0].port, made_topology)

    # a node that lost its data is named, never joined or re-created over: that is the operator's call
    stray = RedisServerProcess(
        port=free_cluster_port({node.port for node in nodes}), extra_args=("--cluster-enabled", "yes")
    )
    stray.start()
    try:
        with_stray = run_init({**env, "REDIS_CLUSTER_NODES": f"{env['REDIS_CLUSTER_NODES']} 127.0.0.1:{stray.port}"})
        assert with_stray.returncode == 0, with_stray.stderr
        assert f"not part of the cluster: 127.0.0.1:{stray.port}" in with_stray.stderr
        assert cluster_info(stray.port)["cluster_known_nodes"] == "1"
        assert_topology(nodes[0].port, made_topology)
    finally:
        stray.close()


def test_the_cluster_init_fails_when_a_node_does_not_answer() -> None:
    lost = free_cluster_port(set())  # nothing listens there
    done = run_init({"REDIS_CLUSTER_NODES": f"127.0.0.1:{lost}", "REDIS_CLUSTER_WAIT": "1"})
    assert done.returncode == 1
    assert f"127.0.0.1:{lost} does not answer after 1s" in done.stderr


@pytest.mark.e2e
async def test_workers_stream_to_the_cluster_the_init_made(
    cluster_nodes: tuple[list[RedisServerProcess], dict[str, str]], settings: Settings
) -> None:
    """The cluster file's worker environment: the job's stream and its tag stream on the cluster,
    the queue (and nothing of the prefix) on the queue's Redis."""
    nodes, init_env = cluster_nodes
    made = run_init(init_env)
    assert made.returncode == 0, made.stderr
    services = compose_of("cluster")["services"]
    seed_name = urlsplit(services["worker"]["environment"]["TOKENBUS_STREAMS_URL"]).hostname
    seed = nodes[
        [a.split(":")[0] for a in services["redis-cluster-init"]["environment"]["REDIS_CLUSTER_NODES"].split()].index(
            seed_name
        )
    ]
    env = settings_env(settings)
    worker_env = {
        k: resolve(v, {}) for k, v in services["worker"]["environment"].items() if k.startswith("TOKENBUS_STREAMS")
    }
    worker_env["TOKENBUS_STREAMS_URL"] = f"redis://127.0.0.1:{seed.port}"
    env.update(worker_env)
    worker = await Process.start("worker", env=env, name="worker")
    cluster = RedisCluster.from_url(env["TOKENBUS_STREAMS_URL"])
    queue = Redis.from_url(env["REDIS_URL"])
    try:
        await worker.wait_line("worker serves graphs", within=90)
        enqueue = await Process.start("enqueue", "joke_poem", "--input", '{"topic": "cats"}', env=env)
        assert await enqueue.wait() == 0, enqueue.output
        job_id = enqueue.stdout[0]
        keys = StreamKeys(settings.prefix)

        async def ended() -> list[Entry] | None:
            raw = await cluster.xrange(keys.job(job_id), "-", "+")
            entries = [Entry.decode(f, id=i.decode(), stream=keys.job(job_id)) for i, f in raw]
            return entries if entries and entries[-1].type == "end" else None

        entries = await wait_for(ended, within=60, what="the job's end entry on the cluster")
        assert "".join(e.content for e in entries if e.type == "token" and e.tags == ("poem",)) == POEM
        tagged = await cluster.xrange(keys.tag("poem"), "-", "+")
        tag_entries = [Entry.decode(f, id=i.decode(), stream=keys.tag("poem")) for i, f in tagged]
        assert "".join(e.content for e in tag_entries if e.job == job_id and e.type == "token") == POEM
        on_queue = [k.decode() async for k in queue.scan_iter(match=f"{settings.prefix}:*")]
        # arq's keys only (the queue is named under the prefix here): no stream, no running set
        assert [k for k in on_queue if not k.startswith(settings.queue_name)] == []
    finally:
        await worker.stop()
        await cluster.aclose()
        await queue.aclose()


class ScriptProcess:
    """A Redis (or Sentinel) started by one of the deploy scripts, its files in ``workdir``."""

    def __init__(self, script: Path, env: dict[str, str], workdir: Path, port: int, *args: str) -> None:
        workdir.mkdir()
        self.port = port
        self.workdir = workdir
        self._log = (workdir / "out.log").open("w")
        self._proc = subprocess.Popen(
            ["sh", str(script), "--bind", "127.0.0.1", "--logfile", str(workdir / "redis.log"), *args],
            env={**os.environ, **env}, cwd=workdir, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
        )  # fmt: skip

    def kill(self) -> None:
        self._proc.kill()
        self._proc.wait(timeout=10)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def sentinel_master(port: int, name: str) -> dict[str, str]:
    lines = cli(port, "sentinel", "master", name).splitlines()
    return dict(zip(lines[::2], lines[1::2], strict=False))


@pytest.mark.e2e
async def test_the_sentinel_variant_serves_the_queue_and_follows_a_failover(tmp_path: Path, settings: Settings) -> None:
    """The Sentinel file's nodes and Sentinels from their own scripts and environment (names made
    local, a 1 s down-after instead of 5 s), a worker and an enqueuer on the worker service's
    settings (REDIS_URL unchanged: its host is not used); the master is SIGKILLed, the Sentinels
    promote the replica (whose config Sentinel rewrites, so it would restart as master) and the
    next job runs on it."""
    services = compose_of("sentinel")["services"]
    local = {"redis": free_port(), "redis-replica": free_port()}
    processes: list[ScriptProcess] = []

    def start(name: str, port: int, *args: str, **env: str) -> ScriptProcess:
        proc = ScriptProcess(script_on_host(services[name]), env, tmp_path / name, port, *args)
        processes.append(proc)
        return proc

    try:
        for name, port in local.items():
            env = dict(services[name]["environment"])
            env.update(REDIS_ANNOUNCE_HOST="127.0.0.1", REDIS_PORT=str(port), REDIS_CONF=str(tmp_path / f"{name}.conf"))
            if "REDIS_REPLICA_OF" in env:
                host = env["REDIS_REPLICA_OF"].split()[0]
                env["REDIS_REPLICA_OF"] = f"127.0.0.1 {local[host]}"
            # the first full sync at once, not after Redis's default 5 s wait for more replicas
            start(name, port, "--repl-diskless-sync-delay", "0", **env)

        def replicating() -> bool:
            try:
                return "state=online" in cli(local["redis"], "info", "replication")
            except subprocess.CalledProcessError:
                return False

        # the replica in sync before the Sentinels start: their first INFO of the master finds it
        # (their next one would come 10 s later)
        await wait_until(replicating, within=30, what="the replica to sync with the master")
        sentinels = sorted(name for name in services if name.startswith("sentinel-"))
        sentinel_ports = []
        for name in sentinels:
            env = dict(services[name]["environment"])
            master_name = env["SENTINEL_MASTER_NAME"]
            env.update(SENTINEL_MASTER_HOST="127.0.0.1", SENTINEL_MASTER_PORT=str(local[env["SENTINEL_MASTER_HOST"]]))
            env.update(
                SENTINEL_DOWN_AFTER="1000", SENTINEL_PORT=str(free_port()), SENTINEL_CONF=str(tmp_path / f"{name}.conf")
            )
            sentinel_ports.append(start(name, int(env["SENTINEL_PORT"]), **env).port)

        def watching() -> bool:
            try:
                views = [sentinel_master(port, master_name) for port in sentinel_ports]
            except subprocess.CalledProcessError:
                return False
            return all(v.get("num-other-sentinels") == "2" and v.get("num-slaves") == "1" for v in views)

        await wait_until(watching, within=60, what="three Sentinels that see each other and the replica")
        assert cli(local["redis"], "config", "get", "appendonly").split() == ["appendonly", "yes"]

        worker_spec = services["worker"]["environment"]
        env = settings_env(settings)
        del env["REDIS_URL"]  # the compose file's, whose host the Sentinels replace
        env.update(
            {k: resolve(v, {}) for k, v in worker_spec.items() if k in ("REDIS_URL", "TOKENBUS_SENTINEL_MASTER")}
        )
        env["TOKENBUS_SENTINELS"] = ",".join(f"127.0.0.1:{port}" for port in sentinel_ports)

        async def job_ends_on(master_port: int) -> None:
            """A job enqueued through the Sentinels ends on the master at ``master_port``."""
            enqueue = await Process.start("enqueue", "joke_poem", "--input", '{"topic": "cats"}', env=env)
            assert await enqueue.wait() == 0, enqueue.output
            key = StreamKeys(settings.prefix).job(enqueue.stdout[0])
            master = Redis(port=master_port)

            async def ended() -> bool:
                last = await master.xrevrange(key, count=1)
                return bool(last) and Entry.decode(last[0][1], id="", stream=key).type == "end"

            try:
                await wait_for(ended, within=90, what=f"{key} to end on the master at {master_port}")
            finally:
                await master.aclose()

        worker = await Process.start("worker", env=env, name="worker")
        try:
            await worker.wait_line("worker serves graphs", within=90)
            await job_ends_on(local["redis"])
            processes[0].kill()  # the master, SIGKILL

            def promoted() -> bool:
                addr = cli(sentinel_ports[0], "sentinel", "get-master-addr-by-name", master_name).split()
                return addr == ["127.0.0.1", str(local["redis-replica"])]

            await wait_until(promoted, within=60, what="the Sentinels to promote the replica")
            await wait_until(
                lambda: "replicaof" not in (tmp_path / "redis-replica.conf").read_text(),
                what="Sentinel's rewrite of the promoted node's config",
            )
            await job_ends_on(local["redis-replica"])
        finally:
            await worker.stop()
    finally:
        for proc in processes:
            proc.close()
