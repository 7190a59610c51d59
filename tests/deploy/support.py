"""What the deploy tests share: where the files are, which settings class each container runs,
and how an environment is checked against it.

The single source for "which command does this container run" is the Dockerfile's ENTRYPOINT
(compose) and the image name (Kubernetes), both mapped here to the command's settings class, so
an environment variable that no field reads is caught wherever it is written.
"""

from __future__ import annotations

import importlib
import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dequeuer.settings import DequeuerSettings
from enqueuer.settings import EnqueuerSettings
from shared.settings import CommandSettings
from url_fetcher.settings import UrlFetcherSettings

# kubernetes-validate ships no type information; these three names are all the tests use.
_kubernetes_validate = importlib.import_module("kubernetes_validate")
KubernetesValidationError: type[Exception] = _kubernetes_validate.ValidationError


def validate_k8s(document: Mapping[str, Any], version: str, *, strict: bool) -> None:
    """Validate against the Kubernetes `version` schemas bundled offline; strict refuses
    unknown fields (a misspelt key would otherwise be dropped silently by the API server)."""
    _kubernetes_validate.validate(dict(document), version, strict=strict)


def latest_k8s_version() -> str:
    return str(_kubernetes_validate.latest_version())


ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
PREFIX = "PROXYMQ_"

SETTINGS: dict[str, type[CommandSettings]] = {
    "proxymq-enqueuer": EnqueuerSettings,
    "proxymq-dequeuer": DequeuerSettings,
    "url-fetcher": UrlFetcherSettings,
}
IMAGES = {  # image repository -> the command its ENTRYPOINT runs (checked against the Dockerfile)
    "proxymq/enqueuer": "proxymq-enqueuer",
    "proxymq/dequeuer": "proxymq-dequeuer",
    "proxymq/url-fetcher": "url-fetcher",
    "proxymq/example-api": None,
}
# The contract's default ports (docs: contract.md, "Components and how they start").
CONTRACT_PORTS = {
    "proxymq-enqueuer": {"port": 8080, "admin_port": 9080},
    "proxymq-dequeuer": {"admin_port": 9081},
    "url-fetcher": {"port": 8000},
}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in load_all(path):
            yield path, document


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in k8s_documents() if d.get("kind") == kind]


def image_command(image: str) -> str | None:
    repository = image.rsplit(":", 1)[0]
    assert repository in IMAGES, f"image {image!r} is not one of ours: {sorted(IMAGES)}"
    return IMAGES[repository]


def dockerfile_lines(path: Path) -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    return lines


def entrypoint(path: Path) -> list[str]:
    found = [line for line in dockerfile_lines(path) if line.upper().startswith("ENTRYPOINT")]
    assert found, f"{path} has no ENTRYPOINT"
    value = found[-1].split(None, 1)[1]
    return list(yaml.safe_load(value)) if value.startswith("[") else shlex.split(value)


def dockerfile_command(path: Path) -> str | None:
    """The console script a Dockerfile runs, if it is one of ours."""
    first = entrypoint(path)[0]
    return first if first in SETTINGS else None


def field_of(variable: str, settings: type[CommandSettings]) -> str | None:
    """The settings field a PROXYMQ_* variable sets (`*_FILE` reads that field from a file)."""
    name = variable.removeprefix(PREFIX).lower()
    if name in settings.model_fields:
        return name
    if name.endswith("_file") and name.removesuffix("_file") in settings.model_fields:
        return name.removesuffix("_file")
    return None


def check_environment(where: str, command: str | None, env: Mapping[str, str | None]) -> None:
    """Every PROXYMQ_* name is a field of the command the container runs, and every literal
    value is one that command accepts (values from a file or the downward API are skipped)."""
    proxymq = {k: v for k, v in env.items() if k.startswith(PREFIX)}
    if command is None:
        assert not proxymq, f"{where}: runs no ProxyMQ command but sets {sorted(proxymq)}"
        return
    settings = SETTINGS[command]
    values: dict[str, str] = {}
    for variable, value in proxymq.items():
        field = field_of(variable, settings)
        assert field is not None, f"{where}: {variable} is not a setting of {command}"
        if value is not None and not variable.endswith("_FILE"):
            values[field] = value
    required = {n for n, f in settings.model_fields.items() if f.is_required()}
    for name in required - values.keys():
        assert any(field_of(v, settings) == name for v in proxymq), f"{where}: {name} unset"
        values[name] = "placeholder"
    try:
        settings.model_validate(values)
    except ValidationError as exc:
        raise AssertionError(f"{where}: {command} refuses its environment: {exc}") from None


def k8s_env(container: dict[str, Any], config_maps: dict[str, dict[str, str]]) -> dict[str, Any]:
    """A container's environment: envFrom ConfigMaps first, then `env` (which wins)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom") or []:
        name = source["configMapRef"]["name"]
        assert name in config_maps, f"envFrom names ConfigMap {name!r}, not in deploy/k8s"
        env.update(config_maps[name])
    for entry in container.get("env") or []:
        env[entry["name"]] = entry.get("value")  # None: valueFrom (not a literal)
    return env


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("Deployment", "StatefulSet", "DaemonSet"):
        for workload in by_kind(kind):
            yield f"{kind}/{workload['metadata']['name']}", workload["spec"]["template"]["spec"]


def config_maps() -> dict[str, dict[str, str]]:
    return {cm["metadata"]["name"]: cm.get("data") or {} for cm in by_kind("ConfigMap")}


def promql_names(expression: str, prefix: str) -> set[str]:
    return set(re.findall(rf"\b{prefix}_[a-z0-9_]+", expression))
