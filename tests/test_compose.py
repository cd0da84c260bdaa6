"""docker-compose.yml, checked as far as a machine without a Docker engine can: its shape, that every
command is a real ``tokenbus`` command and every variable a real setting, and its services run as
local processes against a private Redis."""

from __future__ import annotations

import asyncio
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.sse import free_port
from tests.support import POEM, Process, settings_env
from tokenbus.cli import build_parser
from tokenbus.gateway import GatewaySettings
from tokenbus.worker.settings import Settings

COMPOSE = Path(__file__).parent.parent / "docker-compose.yml"
SETTING_NAMES = {
    str(field.validation_alias) for model in (Settings, GatewaySettings) for field in model.model_fields.values()
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def resolve(value: str, overrides: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}``: our overrides stand in for the operator's environment."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: overrides.get(m[1], m[2]), str(value))


def test_redis_persists_and_reports_health(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"][-1] == "ping"
    assert any(v.endswith(":/data") for v in redis["volumes"])


@pytest.mark.parametrize("service", ["worker", "consumer", "gateway"])
def test_services_run_real_commands_with_real_settings(compose: dict[str, Any], service: str) -> None:
    spec = compose["services"][service]
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
