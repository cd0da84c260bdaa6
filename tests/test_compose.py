"""docker-compose.yml and its overrides (docker-compose.cluster.yml: the streams on a Redis Cluster;
docker-compose.sentinel.yml: the queue behind Sentinel), and .env.example, the settings they read,
checked as far as a machine without a Docker engine can: their shape, that every command is a real
``tokenbus`` command and every variable a real setting (and every setting passable), that their
services run as local processes against a private Redis started from the file's own command (its
password, its memory policy), and that the scripts their Redis services run (the cluster's one-shot
init, the Sentinel nodes) do what they say against local ``redis-server`` processes."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import yaml
from redis import exceptions as redis_errors
from redis.asyncio import Redis, RedisCluster

from tests.sse import free_port
from tests.support import POEM, Process, script_for, settings_env, wait_for, wait_until
from tokenbus.cli import build_parser
from tokenbus.gateway import GatewaySettings
from tokenbus.redis_server import CLUSTER_BUS_OFFSET, RedisServerProcess, free_cluster_port
from tokenbus.schemas.entries import Entry
from tokenbus.schemas.keys import StreamKeys
from tokenbus.worker.settings import Settings

ROOT = Path(__file__).parent.parent
COMPOSE = ROOT / "docker-compose.yml"
OVERRIDES = {"cluster": ROOT / "docker-compose.cluster.yml", "sentinel": ROOT / "docker-compose.sentinel.yml"}
ENV_EXAMPLE = ROOT / ".env.example"
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
SET_BY_THE_FILES = {
    "REDIS_URL",  # the redis service's, with REDIS_PASSWORD
    "TOKENBUS_METRICS_PORT",  # the port the worker's healthcheck asks and `expose` names
    "TOKENBUS_METRICS_HOST",
    "TOKENBUS_SENTINELS",  # docker-compose.sentinel.yml
    "TOKENBUS_SENTINEL_MASTER",
    "TOKENBUS_SENTINEL_PASSWORD",  # none: docker-compose.sentinel.yml's Sentinels ask for none
    "TOKENBUS_STREAMS_URL",  # docker-compose.cluster.yml
    "TOKENBUS_STREAMS_CLUSTER",
}
"""The settings the files decide; every other one is passed from .env (or the shell) as it is."""
PASSWORD = "0123456789abcdef" * 4
"""REDIS_PASSWORD as README says to make one (``openssl rand -hex 32``)."""


def dotenv(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """A .env file's variables as Compose reads them (``NAME=value``, a value in single quotes
    taken as it is), and the ones it documents in comments (``# NAME=default``)."""
    values: dict[str, str] = {}
    documented: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"(# )?([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            value = match[3]
            if len(value) >= 2 and value[0] == value[-1] == "'":
                value = value[1:-1]
            (documented if match[1] else values)[match[2]] = value
    return values, documented


def operator_env(**overrides: str) -> dict[str, str]:
    """What Compose interpolates the files with: the shipped .env.example, copied to .env with a
    password set, and ``overrides`` from the operator's shell."""
    return {**dotenv(ENV_EXAMPLE)[0], "REDIS_PASSWORD": PASSWORD, **overrides}


def resolve(value: Any, env: Mapping[str, str] | None = None) -> str:
    """Compose's interpolation of ``${VAR:-default}``, ``${VAR:?error}`` and ``${VAR}`` in ``env``
    (default: :func:`operator_env`); a missing required variable raises, as Compose refuses to start."""
    env = operator_env() if env is None else env

    def value_of(match: re.Match[str]) -> str:
        name, op, arg = match[1], match[2], match[3]
        if env.get(name):
            return env[name]
        if op == ":?":
            raise LookupError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", value_of, str(value))


def variables(text: str) -> set[str]:
    """The variables a compose file interpolates."""
    return set(re.findall(r"\$\{(\w+)", text))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(COMPOSE)


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


def on_host(spec: dict[str, Any], args: list[str]) -> list[str]:
    """A service's command with the paths of its bind mounts made the repository's directories."""
    mounts = {}
    for volume in spec.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            mounts[target] = str(ROOT / source)
    return [mounts.get(arg, arg) for arg in args]


def seconds(duration: str) -> float:
    """A Compose duration such as ``45s``, ``1m30s``."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_redis_persists_and_reports_health(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]  # with REDISCLI_AUTH, the password
    assert resolve(redis["environment"]["REDISCLI_AUTH"]) == PASSWORD
    assert any(v.endswith(":/data") for v in redis["volumes"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_redis_asks_for_the_password_and_never_evicts(variant: str) -> None:
    """Each data node of each variant: ``requirepass`` (and, where it may replicate, ``masterauth``)
    of REDIS_PASSWORD, ``maxmemory`` REDIS_MAXMEMORY, ``noeviction``; the clients' URLs carry the
    password; and without REDIS_PASSWORD Compose refuses the files."""
    services = compose_of(variant)["services"]
    nodes = {name: spec for name, spec in services.items() if name.startswith("redis") and name != "redis-cluster-init"}
    for name, spec in nodes.items():
        if spec["command"][0] == "redis-server":
            flags = options([resolve(arg) for arg in spec["command"]])
        else:  # the Sentinel file's nodes: redis.sh puts them on the command line
            script = script_on_host(spec).read_text()
            env = {k: resolve(v) for k, v in spec["environment"].items()}
            assert '--requirepass "${REDISCLI_AUTH:?' in script and '--masterauth "$REDISCLI_AUTH"' in script
            assert '--maxmemory "${REDIS_MAXMEMORY:-1gb}" --maxmemory-policy noeviction' in script
            flags = {"--requirepass": env["REDISCLI_AUTH"], "--masterauth": env["REDISCLI_AUTH"]}
            flags |= {"--maxmemory": env["REDIS_MAXMEMORY"], "--maxmemory-policy": "noeviction"}
        assert flags["--requirepass"] == PASSWORD, name
        assert flags.get("--masterauth", PASSWORD) == PASSWORD, name
        assert "--masterauth" in flags or (name == "redis" and variant in ("single", "cluster")), name
        assert flags["--maxmemory"] == operator_env()["REDIS_MAXMEMORY"], name
        assert flags["--maxmemory-policy"] == "noeviction", name
        assert resolve(spec["environment"]["REDISCLI_AUTH"]) == PASSWORD, name  # for the healthcheck
    for service in TOKENBUS_SERVICES:
        env = services[service]["environment"]
        for url in (env["REDIS_URL"], env.get("TOKENBUS_STREAMS_URL", env["REDIS_URL"])):
            assert urlsplit(resolve(url)).password == PASSWORD
    for sentinel in (name for name in services if name.startswith("sentinel-")):
        assert resolve(services[sentinel]["environment"]["SENTINEL_AUTH_PASS"]) == PASSWORD
    for path in (COMPOSE, *(OVERRIDES[name] for name in VARIANTS[variant])):
        text = path.read_text()
        without = {k: v for k, v in operator_env().items() if k != "REDIS_PASSWORD"}
        if "REDIS_PASSWORD" in variables(text):
            with pytest.raises(LookupError, match=r"set REDIS_PASSWORD in \.env"):
                resolve(text, without)


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


@pytest.mark.parametrize("service", TOKENBUS_SERVICES)
def test_every_tokenbus_service_builds_the_image_it_runs(compose: dict[str, Any], service: str) -> None:
    """Each one can be started alone on a machine that never built the image: a service with only
    ``image:`` would have it pulled, and tokenbus:latest is on no registry."""
    spec = compose["services"][service]
    assert spec["build"] == "." and (ROOT / "Dockerfile").is_file()
    assert spec["image"] == "tokenbus:latest"


@pytest.mark.parametrize("service", TOKENBUS_SERVICES)
def test_every_setting_is_passed_from_env(compose: dict[str, Any], service: str) -> None:
    """Each setting that the files do not decide reaches each tokenbus service as the operator set
    it (``${NAME:-}``: unset or empty is tokenbus's own default), the gateway's to the gateway."""
    env = compose["services"][service]["environment"]
    models = (Settings, GatewaySettings) if service == "gateway" else (Settings,)
    for model in models:
        for field in model.model_fields.values():
            name = str(field.validation_alias)
            if name in SET_BY_THE_FILES:
                assert not str(env.get(name, "")).startswith(f"${{{name}"), name
            else:
                assert env.get(name) == f"${{{name}:-}}", f"{service} does not pass {name}"


def test_env_example_documents_every_variable_and_each_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """.env.example names every variable the files read (set, or commented out with its default)
    and nothing else; its defaults are tokenbus's; it ships no password."""
    values, documented = dotenv(ENV_EXAMPLE)
    assert not set(values) & set(documented)
    named = set(values) | set(documented)
    used = set().union(*(variables(path.read_text()) for path in (COMPOSE, *OVERRIDES.values())))
    assert sorted(used - named) == [], "variables of the compose files that .env.example does not name"
    assert sorted(named - used) == [], "variables of .env.example that no compose file reads"
    assert sorted(used & SET_BY_THE_FILES) == []  # the files' own: not the operator's
    assert values["REDIS_PASSWORD"] == ""  # each deployment makes its own
    for model in (Settings, GatewaySettings):
        for field in model.model_fields.values():
            name = str(field.validation_alias)
            with monkeypatch.context() as env:  # read from the environment, as in a container
                if documented.get(name):  # a default shown: it is the one in force
                    env.setenv(name, documented[name])
                    shown = getattr(model(), field_name(model, name))
                    assert shown == field.get_default(call_default_factory=True), name
                if values.get(name):
                    env.setenv(name, values[name])
                    model()  # a value tokenbus accepts


def field_name(model: type[Settings] | type[GatewaySettings], alias: str) -> str:
    return next(name for name, field in model.model_fields.items() if field.validation_alias == alias)


def test_the_worker_gets_longer_to_stop_than_its_jobs_get_to_finish(compose: dict[str, Any]) -> None:
    """Compose cannot add to a variable: ``stop_grace_period`` is TOKENBUS_STOP_GRACE_PERIOD, kept
    10 s or more above TOKENBUS_SHUTDOWN_GRACE (time to cancel, re-queue and write what is left),
    with the files' defaults and with .env.example's values."""
    worker = compose["services"]["worker"]
    default_grace = Settings.model_fields["shutdown_grace_s"].default
    assert seconds(resolve(worker["stop_grace_period"], {})) >= default_grace + 10
    shipped = operator_env()
    grace = float(shipped.get("TOKENBUS_SHUTDOWN_GRACE") or default_grace)
    assert seconds(resolve(worker["stop_grace_period"], shipped)) >= grace + 10


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_log_is_rotated(variant: str) -> None:
    for name, spec in compose_of(variant)["services"].items():
        logging = spec.get("logging", {})
        assert logging.get("driver") == "json-file", name
        assert resolve(logging["options"]["max-size"]).endswith("m"), name
        assert int(resolve(logging["options"]["max-file"])) >= 2, name


def test_your_graphs_are_mounted_where_the_worker_imports_them(compose: dict[str, Any]) -> None:
    """./graphs, read-only, is the workers' --app-dir; the graph shipped there is README's."""
    worker = compose["services"]["worker"]
    command = worker["command"]
    app_dir = command[command.index("--app-dir") + 1]
    assert f"./graphs:{app_dir}:ro" in worker["volumes"]
    section = (ROOT / "README.md").read_text().split("## Writing your own graph", 1)[1]
    module = section.split("```python\n", 1)[1].split("```", 1)[0]
    path = module.splitlines()[0].removeprefix("# ")
    assert (ROOT / "graphs" / path).read_text() == module
    assert orjson.loads(operator_env()["TOKENBUS_GRAPHS"]) == {"answer": f"{path[:-3].replace('/', '.')}:graph"}


@pytest.mark.e2e
async def test_the_gateway_service_serves_and_its_healthcheck_passes(
    compose: dict[str, Any], settings: Settings
) -> None:
    """The gateway's command on a free port, and its healthcheck's own command against it."""
    spec = compose["services"]["gateway"]
    published = resolve(spec["ports"][0])
    assert published.startswith("127.0.0.1:") and published.endswith(":8000")  # the host's loopback by default
    port = free_port()
    command = [str(port) if arg == "8000" else "127.0.0.1" if arg == "0.0.0.0" else arg for arg in spec["command"]]
    env = {
        **settings_env(settings),
        **{k: resolve(v) for k, v in spec["environment"].items() if k.startswith("TOKENBUS_GATEWAY")},
    }
    env = {k: v for k, v in env.items() if v != ""}
    gateway = await Process.start(*command[1:], env=env, name="gateway")
    try:
        await gateway.wait_line("gateway listening on", within=90)  # imports take long on a busy machine
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


@pytest.mark.e2e
async def test_services_run_as_local_processes(compose: dict[str, Any], settings: Settings) -> None:
    """The redis service's own command (its password, its memory policy) as a private redis-server;
    two workers (``--scale worker=2``) with ./graphs as their --app-dir, and the consumer, each with
    the environment Compose gives it from the shipped .env.example (a password set, the test's model
    and prefix). The consumer prints every job's poem; stopped, it misses nothing written
    meanwhile and prints nothing twice when it is back (its consumer group)."""
    redis_command = [resolve(arg) for arg in compose["services"]["redis"]["command"]]
    assert redis_command[0] == "redis-server"
    server = RedisServerProcess(extra_args=tuple(redis_command[1:]))
    server.start()
    shell = {
        "OPENAI_BASE_URL": str(settings.openai_base_url),
        "OPENAI_API_KEY": "test-key",
        "TOKENBUS_PREFIX": settings.prefix,
        "TOKENBUS_QUEUE": settings.queue_name,
    }
    admin = Redis(port=server.port, password=PASSWORD)
    processes: list[Process] = []
    metrics_ports: list[int] = []

    def service_env(service: str) -> dict[str, str]:
        """The service's environment in its container, the service names made local addresses."""
        env = {k: resolve(v, operator_env(**shell)) for k, v in compose["services"][service]["environment"].items()}
        env["REDIS_URL"] = env["REDIS_URL"].replace("@redis:6379/", f"@127.0.0.1:{server.port}/")
        outside = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENBUS_", "OPENAI_", "REDIS_URL"))}
        return outside | {"PYTHONUNBUFFERED": "1"} | env

    async def start(service: str, name: str) -> Process:
        spec = compose["services"][service]
        env = service_env(service)
        if service == "worker":
            assert env["TOKENBUS_METRICS_HOST"] == "0.0.0.0"  # for Prometheus, from the compose network
            metrics_ports.append(free_port())  # one machine here, a container each there
            env.update(TOKENBUS_METRICS_PORT=str(metrics_ports[-1]), TOKENBUS_METRICS_HOST="127.0.0.1")
        proc = await Process.start(*on_host(spec, spec["command"])[1:], env=env, name=name)
        processes.append(proc)
        return proc

    async def enqueue(*args: str) -> Process:  # `docker compose run --rm worker tokenbus enqueue ...`
        proc = await Process.start("enqueue", *args, env=service_env("worker"))
        assert await proc.wait() == 0, proc.output
        return proc

    async def poems(consumer: Process, job_ids: list[str]) -> list[dict[str, Any]]:
        for job_id in job_ids:  # the consumer service prints every job's poem, then its end entry
            await consumer.wait_line(f'"type":"end","job":"{job_id}"', stream="stdout")
        entries = [orjson.loads(line) for line in consumer.stdout]
        for job_id in job_ids:
            chunks = [e for e in entries if e["job"] == job_id and e["type"] == "token"]
            assert "".join(e["content"] for e in chunks) == POEM
            assert all(e["tags"] == ["poem"] for e in chunks)
        return entries

    try:
        assert await admin.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        anyone = Redis(port=server.port)
        try:
            with pytest.raises(redis_errors.AuthenticationError):
                await anyone.ping()  # no password, no Redis
        finally:
            await anyone.aclose()
        workers = [await start("worker", f"worker-{i}") for i in range(2)]
        for w in workers:
            await w.wait_line("worker serves graphs: answer, joke_poem", within=90)
        for port in metrics_ports:  # each worker's healthcheck, as compose runs it in its container
            assert await healthcheck(compose["services"]["worker"], 9100, port) == 0
        consumer = await start("consumer", "consumer")
        job_ids = [(await enqueue("joke_poem", "--input", '{"topic": "cats"}')).stdout[0] for _ in range(4)]
        await poems(consumer, job_ids)
        keys = StreamKeys(settings.prefix)
        command = compose["services"]["consumer"]["command"]
        group = command[command.index("--group") + 1]

        async def all_acked() -> bool:
            return (await admin.xpending(keys.tag("poem"), group))["pending"] == 0

        await wait_for(all_acked, what="the consumer to ack what it printed")
        await consumer.stop()

        # the consumer is down: a job streams, and a job of ./graphs' own graph runs
        (missed,) = (await enqueue("joke_poem", "--input", '{"topic": "cats"}', "--follow")).stdout[:1]
        question = "What is tokenbus?"
        message = {"messages": [{"role": "user", "content": question}]}
        answer = await enqueue("answer", "--input", orjson.dumps(message).decode(), "--follow")
        assert "".join(answer.stdout[1:]).strip() == script_for(question).strip(), answer.output

        back = await start("consumer", "consumer-again")
        entries = await poems(back, [missed])
        assert {e["job"] for e in entries} == {missed}  # what it missed, and nothing it had printed
    finally:
        for proc in processes:
            await proc.stop()
        await admin.aclose()
        server.close()


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
        published += [resolve(port).rsplit(":", 1)[0] for port in spec.get("ports", [])]
    assert len(published) == len(set(published)), f"two services publish one host port: {sorted(published)}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("service", TOKENBUS_SERVICES)
def test_each_variant_puts_the_queue_and_the_streams_where_it_says(variant: str, service: str) -> None:
    services = compose_of(variant)["services"]
    spec = services[service]
    env = {k: resolve(v) for k, v in spec["environment"].items()}
    # Settings' own checks: the URLs, a cluster without a URL, the Sentinel list's form
    values: dict[str, Any] = {k: v for k, v in env.items() if k in STREAMS_SETTINGS & SET_BY_THE_FILES and v != ""}
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
        assert [resolve(p) for p in spec["ports"]] == [f"127.0.0.1:{port}:{port}"]  # the same port out and in
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
        if "redis-cli" in text:
            read.add("REDISCLI_AUTH")  # redis-cli's own: the password it sends
        assert set(spec.get("environment", {})) <= read, f"{name} sets variables its script does not read"
        required = set(re.findall(r"\$\{(\w+):\?", text))
        assert required <= set(spec.get("environment", {})), f"{name} lacks variables its script needs"
    redis, replica = data["services"]["redis"], data["services"]["redis-replica"]
    assert redis["environment"]["REDIS_ANNOUNCE_HOST"] == "redis" and "REDIS_REPLICA_OF" not in redis["environment"]
    assert replica["environment"] == {
        "REDIS_ANNOUNCE_HOST": "redis-replica",
        "REDIS_REPLICA_OF": "redis 6379",
        **{k: redis["environment"][k] for k in ("REDISCLI_AUTH", "REDIS_MAXMEMORY")},  # as the master's
    }
    assert any(v.endswith(":/data") for v in redis["volumes"])  # the base's AOF volume, kept


# --- the scripts, run against local redis-server processes ----------------------------------------


def cli(port: int, *args: str, password: str | None = PASSWORD) -> str:
    """``redis-cli`` as the services' healthchecks run it: the password in REDISCLI_AUTH (none for a Sentinel)."""
    env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"} | (
        {"REDISCLI_AUTH": password} if password else {}
    )
    done = subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, check=True, timeout=10, env=env
    )
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
    init_env = {k: resolve(v) for k, v in services["redis-cluster-init"]["environment"].items()}
    taken: set[int] = set()
    nodes: list[RedisServerProcess] = []
    addresses: list[str] = []
    for address in init_env["REDIS_CLUSTER_NODES"].split():
        name = address.split(":")[0]
        flags = options([resolve(arg) for arg in services[name]["command"]])
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
        port=free_cluster_port({node.port for node in nodes}),
        extra_args=("--cluster-enabled", "yes", "--requirepass", PASSWORD, "--masterauth", PASSWORD),
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
    seed_name = urlsplit(resolve(services["worker"]["environment"]["TOKENBUS_STREAMS_URL"])).hostname
    seed = nodes[
        [a.split(":")[0] for a in services["redis-cluster-init"]["environment"]["REDIS_CLUSTER_NODES"].split()].index(
            seed_name
        )
    ]
    env = settings_env(settings)
    worker_env = {
        k: resolve(v) for k, v in services["worker"]["environment"].items() if k.startswith("TOKENBUS_STREAMS")
    }
    worker_env["TOKENBUS_STREAMS_URL"] = f"redis://:{PASSWORD}@127.0.0.1:{seed.port}"
    env.update(worker_env)
    worker = await Process.start("worker", env=env, name="worker")
    cluster = RedisCluster.from_url(env["TOKENBUS_STREAMS_URL"])
    queue = Redis.from_url(env["REDIS_URL"])  # the test's Redis, without a password
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
    lines = cli(port, "sentinel", "master", name, password=None).splitlines()
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
            env = {k: resolve(v) for k, v in services[name]["environment"].items()}
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
            env = {k: resolve(v) for k, v in services[name]["environment"].items()}
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
        env.update({k: resolve(v) for k, v in worker_spec.items() if k in ("REDIS_URL", "TOKENBUS_SENTINEL_MASTER")})
        env["TOKENBUS_SENTINELS"] = ",".join(f"127.0.0.1:{port}" for port in sentinel_ports)

        async def job_ends_on(master_port: int) -> None:
            """A job enqueued through the Sentinels ends on the master at ``master_port``."""
            enqueue = await Process.start("enqueue", "joke_poem", "--input", '{"topic": "cats"}', env=env)
            assert await enqueue.wait() == 0, enqueue.output
            key = StreamKeys(settings.prefix).job(enqueue.stdout[0])
            master = Redis(port=master_port, password=PASSWORD)

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
                addr = cli(sentinel_ports[0], "sentinel", "get-master-addr-by-name", master_name, password=None).split()
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
