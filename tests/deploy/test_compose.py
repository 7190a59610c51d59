"""docker-compose.yml: it parses, everything it points at exists, every container's PROXYMQ_*
environment is what its command reads, ports are the contract's, every service is health
checked. No Docker engine is needed: these are the mistakes that otherwise show up only at
`docker compose up`."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.deploy.support import (
    CONTRACT_PORTS,
    IMAGES,
    ROOT,
    check_environment,
    dockerfile_command,
)

COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) resolved as compose does
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def command_of(service: dict[str, Any]) -> str | None:
    build = service.get("build")
    if build is None:
        return None
    context = ROOT / (build if isinstance(build, str) else build["context"])
    dockerfile = context / (
        build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
    )
    return dockerfile_command(dockerfile)


def test_builds_point_at_existing_dockerfiles_and_images_name_their_command(
    services: dict[str, dict[str, Any]],
) -> None:
    built = 0
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        built += 1
        context = ROOT / build["context"]
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert context.is_dir(), f"{name}: build context {context} missing"
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        repository = service["image"].rsplit(":", 1)[0]
        assert IMAGES[repository] == dockerfile_command(dockerfile), (
            f"{name}: image {service['image']} is tagged for another command than {dockerfile}"
        )
    assert built >= 4  # url-fetcher, dequeuer, enqueuer, example API


def test_mounted_files_and_secrets_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: mounts missing {source}"
        for secret in service.get("secrets") or []:
            assert secret in compose["secrets"], f"{name}: unknown secret {secret}"
    for name, secret in compose["secrets"].items():
        assert (ROOT / secret["file"]).is_file(), f"secret {name}: {secret['file']} missing"


def test_every_service_has_a_health_check(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        test = (service.get("healthcheck") or {}).get("test")
        assert test, f"{name} has no health check"
        assert test[0] in ("CMD", "CMD-SHELL"), f"{name}: {test}"


def test_sidecars_check_readyz_on_their_admin_port(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        command = command_of(service)
        if command in ("proxymq-enqueuer", "proxymq-dequeuer"):
            test = service["healthcheck"]["test"]
            port = str(CONTRACT_PORTS[command]["admin_port"])
            assert "/readyz" in test, f"{name}: {test}"
            assert port in test, f"{name}: {test}"


def test_environment_matches_each_commands_settings(services: dict[str, dict[str, Any]]) -> None:
    commands = set()
    for name, service in services.items():
        env = {
            k: None if v is None else str(v) for k, v in (service.get("environment") or {}).items()
        }
        command = command_of(service)
        commands.add(command)
        check_environment(f"compose service {name}", command, env)
    assert {"proxymq-enqueuer", "proxymq-dequeuer", "url-fetcher"} <= commands


def test_ports_are_the_contract_defaults(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        command = command_of(service)
        env = service.get("environment") or {}
        for field, port in CONTRACT_PORTS.get(command or "", {}).items():
            variable = f"PROXYMQ_{field.upper()}"
            if variable in env:
                assert int(env[variable]) == port, f"{name}: {variable}={env[variable]}"


def test_the_amqp_url_comes_from_the_secret_file(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        env = service.get("environment") or {}
        assert "PROXYMQ_AMQP_URL" not in env, f"{name}: the AMQP URL belongs in a secret"
        if command_of(service) in ("proxymq-enqueuer", "proxymq-dequeuer"):
            assert env["PROXYMQ_AMQP_URL_FILE"] == "/run/secrets/amqp_url"
            assert "amqp_url" in service["secrets"]
            assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://jaeger:")


def test_each_dequeuer_shares_its_own_fetchers_namespace(
    services: dict[str, dict[str, Any]],
) -> None:
    """Pairs, not replicas: `network_mode: service:X` joins one container of X, so two
    dequeuer replicas would share the first fetcher's namespace and collide on port 9081."""
    owners = []
    for name, service in services.items():
        if command_of(service) == "proxymq-dequeuer":
            mode = service["network_mode"]
            assert mode.startswith("service:"), name
            owner = mode.removeprefix("service:")
            assert command_of(services[owner]) == "url-fetcher", f"{name} joins {owner}"
            assert service["depends_on"][owner]["condition"] == "service_healthy"
            assert service["environment"]["PROXYMQ_TARGET"] == "http://127.0.0.1:8000"
            assert "deploy" not in service, f"{name}: replicas cannot pair with network_mode"
            owners.append(owner)
    assert len(owners) == len(set(owners)) == 2, owners


def test_the_api_joins_its_enqueuers_namespace(services: dict[str, dict[str, Any]]) -> None:
    """The enqueuer owns the namespace, so compose starts it first and stops it last."""
    api = services["api"]
    assert api["network_mode"] == "service:enqueuer"
    assert api["environment"]["ENQUEUER_URL"] == "http://127.0.0.1:8080"
    assert "8090" in " ".join(services["enqueuer"]["ports"])


def test_rabbitmq_gets_the_plugins_and_per_object_metrics(
    services: dict[str, dict[str, Any]],
) -> None:
    rabbit = services["rabbitmq"]
    assert rabbit["image"] == "rabbitmq:3.10-management"
    mounts = dict(v.split(":")[:2] for v in rabbit["volumes"] if v.startswith("."))
    plugins = (ROOT / "deploy/rabbitmq/enabled_plugins").read_text()
    for plugin in (
        "rabbitmq_consistent_hash_exchange",
        "rabbitmq_management",
        "rabbitmq_prometheus",
    ):
        assert plugin in plugins
    assert mounts["./deploy/rabbitmq/enabled_plugins"] == "/etc/rabbitmq/enabled_plugins"
    config = mounts["./deploy/rabbitmq/rabbitmq.conf"]
    assert config.startswith("/etc/rabbitmq/conf.d/"), "the image's own conf.d must stay"
    text = (ROOT / "deploy/rabbitmq/rabbitmq.conf").read_text()
    assert "prometheus.return_per_object_metrics = true" in text
    assert "management_agent.disable_metrics_collector = false" in text


def test_demo_credentials_agree(services: dict[str, dict[str, Any]]) -> None:
    users = (ROOT / "deploy/compose/rabbitmq-demo-user.conf").read_text()
    user = next(
        line.split("=")[1].strip() for line in users.splitlines() if line.startswith("default_user")
    )
    password = next(
        line.split("=")[1].strip() for line in users.splitlines() if line.startswith("default_pass")
    )
    url = (ROOT / "deploy/compose/amqp-url").read_text().strip()
    assert url == f"amqp://{user}:{password}@rabbitmq:5672/"


def test_prometheus_scrapes_every_sidecar_and_rabbitmq(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    expected = {"rabbitmq:15692"}
    for name, service in services.items():
        command = command_of(service)
        if command in ("proxymq-enqueuer", "proxymq-dequeuer"):
            owner = service.get("network_mode", f"service:{name}").removeprefix("service:")
            expected.add(f"{owner}:{CONTRACT_PORTS[command]['admin_port']}")
    assert expected <= targets, expected - targets
