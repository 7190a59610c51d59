"""deploy/k8s: schema-valid offline, native sidecars probed the safe way, a grace period that
covers the drain, secrets as files, real settings names, and the KEDA objects that
`proxymq keda` prints."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from dequeuer.settings import DequeuerSettings
from enqueuer.settings import EnqueuerSettings
from shared import topology
from shared.cli import inject, keda
from tests.deploy.support import (
    CONTRACT_PORTS,
    K8S,
    KubernetesValidationError,
    by_kind,
    check_environment,
    config_maps,
    image_command,
    k8s_documents,
    k8s_env,
    latest_k8s_version,
    pod_specs,
    validate_k8s,
)

# Native sidecars (restartPolicy on init containers) are on by default from 1.29.
VERSIONS = ["1.29.0", latest_k8s_version()]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*(pod.get("initContainers") or []), *pod["containers"]]


def sidecars(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in pod.get("initContainers") or [] if c["name"].startswith("proxymq-")]


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_strictly(version: str) -> None:
    checked = 0
    for _, document in k8s_documents():
        if document["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked field by field below
        validate_k8s(document, version, strict=True)
        checked += 1
    assert checked >= 7, "a manifest file went missing"


def test_strict_validation_is_not_vacuous() -> None:
    deployment = by_kind("Deployment")[0]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(KubernetesValidationError):
        validate_k8s(broken, VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    present = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present


def test_sidecars_are_native_and_probed_on_their_admin_port() -> None:
    seen = set()
    for name, pod in pod_specs():
        for sidecar in sidecars(pod):
            command = image_command(sidecar["image"])
            assert command is not None
            seen.add(command)
            assert sidecar["restartPolicy"] == "Always", f"{name}: {sidecar['name']} not native"
            port = CONTRACT_PORTS[command]["admin_port"]
            ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
            for probe, path in (
                ("startupProbe", "/healthz"),
                ("livenessProbe", "/healthz"),
                ("readinessProbe", "/readyz"),
            ):
                get = sidecar[probe]["httpGet"]
                assert get["path"] == path, f"{name}: {sidecar['name']} {probe} on {get['path']}"
                assert ports.get(get["port"], get["port"]) == port, f"{name}: {probe} port"
    assert seen == {"proxymq-enqueuer", "proxymq-dequeuer"}


def test_environment_names_and_values_are_real_settings() -> None:
    maps = config_maps()
    checked = 0
    for name, pod in pod_specs():
        for container in containers(pod):
            command = image_command(container["image"])
            env = k8s_env(container, maps)
            check_environment(f"{name} container {container['name']}", command, env)
            for field, port in CONTRACT_PORTS.get(command or "", {}).items():
                value = env.get(f"PROXYMQ_{field.upper()}")
                assert value is None or int(value) == port, f"{name}: {field}={value}"
            checked += 1
    assert checked >= 4


def test_the_amqp_url_is_a_file_from_a_secret() -> None:
    secrets = {s["metadata"]["name"]: s for s in by_kind("Secret")}
    for name, pod in pod_specs():
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        for container in sidecars(pod):
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert "PROXYMQ_AMQP_URL" not in env, f"{name}: the URL belongs in a Secret file"
            path = env["PROXYMQ_AMQP_URL_FILE"]
            mount = next(
                m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")
            )
            secret = volumes[mount["name"]]["secret"]
            key = path.removeprefix(mount["mountPath"] + "/")
            assert key in secrets[secret["secretName"]]["stringData"], f"{name}: no key {key}"
            assert mount.get("readOnly") is True


def test_url_fetcher_drains_before_it_stops() -> None:
    """The kubelet stops native sidecars after the main containers; url-fetcher's preStop makes
    the dequeuer drain first, and the grace period covers that drain."""
    pod = next(w for w in by_kind("Deployment") if w["metadata"]["name"] == "url-fetcher")
    spec = pod["spec"]["template"]["spec"]
    dequeuer = sidecars(spec)[0]
    fetcher = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in dequeuer["env"]}
    shutdown = float(
        env.get("PROXYMQ_SHUTDOWN_GRACE") or DequeuerSettings.model_fields["shutdown_grace"].default
    )
    grace = spec["terminationGracePeriodSeconds"]
    assert grace >= shutdown + inject.GRACE_MARGIN == inject.required_grace()
    hook = fetcher["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:2] == ["python", "/usr/local/lib/proxymq/drain.py"]
    # A fixed --timeout would not follow a raised PROXYMQ_SHUTDOWN_GRACE (operations.md says to
    # raise it with the grace period only); without one the hook waits the dequeuer's grace + 10.
    assert "--timeout" not in hook, "the hook's wait must follow the dequeuer's own grace"
    timeout = shutdown + 10
    assert shutdown < timeout < grace, "the hook must outwait the drain and leave url-fetcher time"
    # drain.py POSTs to port 9081 (the dequeuer's default, test_container_scripts.py): there.
    assert "--port" not in hook
    assert "PROXYMQ_ADMIN_PORT" not in {e["name"] for e in fetcher.get("env", [])}
    assert env["PROXYMQ_ADMIN_PORT"] == str(DequeuerSettings.model_fields["admin_port"].default)
    assert env["PROXYMQ_TARGET"] == "http://127.0.0.1:8000"
    assert "replicas" not in pod["spec"], "KEDA owns the replica count"


def test_only_the_sidecars_see_the_amqp_secret() -> None:
    """No pod shares its process namespace, and only the sidecar mounts the Secret: url-fetcher
    (which fetches what callers name) read the dequeuer's AMQP URL through /proc/PID/root and
    /proc/PID/environ when the drain hook still signalled the dequeuer that way."""
    for workload, spec in pod_specs():
        assert not spec.get("shareProcessNamespace"), workload
        secrets = {v["name"] for v in spec.get("volumes", []) if "secret" in v}
        for container in spec["containers"]:
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            assert not mounted & secrets, f"{workload} {container['name']}"


def test_api_reaches_its_enqueuer_on_localhost_and_is_served() -> None:
    api = next(w for w in by_kind("Deployment") if w["metadata"]["name"] == "api")
    spec = api["spec"]["template"]["spec"]
    main = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["ENQUEUER_URL"] == "http://127.0.0.1:8080"
    enqueuer = {e["name"]: e.get("value") for e in sidecars(spec)[0]["env"]}
    assert enqueuer["PROXYMQ_HOST"] == "127.0.0.1"
    service = next(s for s in by_kind("Service") if s["metadata"]["name"] == "api")
    assert (
        service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    )
    # The API's preStop and calls, then the enqueuer's wait for the replies still awaited.
    stop = float(
        enqueuer.get("PROXYMQ_SHUTDOWN_GRACE")
        or EnqueuerSettings.model_fields["shutdown_grace"].default
    )
    assert spec["terminationGracePeriodSeconds"] > 5 + float(env["API_TIMEOUT"]) + stop


def test_pods_hold_no_api_token_and_trace_only_when_asked() -> None:
    """Nothing in these pods calls the Kubernetes API, so none holds a token for it. Tracing
    was on in every pod, exporting to a collector that a cluster may not have (each pod then
    logged the exporter's errors): the shared settings name none."""
    for name, spec in pod_specs():
        assert spec.get("automountServiceAccountToken") is False, name
    for name, data in config_maps().items():
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in data, name


def test_disruption_budgets_select_their_deployments() -> None:
    deployments = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    budgets = {b["metadata"]["name"]: b for b in by_kind("PodDisruptionBudget")}
    assert budgets.keys() == deployments.keys()
    for name, budget in budgets.items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert budget["spec"]["maxUnavailable"] == 1


def keda_objects() -> tuple[dict[str, Any], dict[str, Any]]:
    (scaled,) = by_kind("ScaledObject")
    (auth,) = by_kind("TriggerAuthentication")
    return scaled, auth


def test_scaled_object_sums_exactly_the_partition_queues() -> None:
    scaled, auth = keda_objects()
    (trigger,) = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "rabbitmq"
    assert meta["queueName"] == topology.partition_pattern("url-fetcher")
    assert meta["useRegex"] == "true"
    assert meta["protocol"] == "http"
    assert meta["operation"] == "sum"
    assert meta["mode"] == "QueueLength"
    assert meta["excludeUnacknowledged"] == "false", "unacked work must keep its pods"
    assert int(meta["pageSize"]) >= DequeuerSettings.model_fields["partitions"].default
    assert int(meta["pageSize"]) <= 500, "RabbitMQ answers 400 to larger pages"
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata is strings"
    pattern = re.compile(meta["queueName"])
    assert all(pattern.match(f"url-fetcher.p{i}") for i in range(8))
    for other in (
        "url-fetcher.dlq",
        "url-fetcher.members",
        "url-fetcher-x.p0",
        "xurl-fetcher.p1",
        "url-fetcher.p1x",
    ):
        assert not pattern.match(other), other
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]


def test_scaled_object_scales_to_zero_gently() -> None:
    scaled, _ = keda_objects()
    spec = scaled["spec"]
    assert spec["minReplicaCount"] == 0
    assert spec["maxReplicaCount"] >= 1
    assert spec["cooldownPeriod"] > 0
    scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 60
    target = spec["scaleTargetRef"]
    assert any(
        d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
        for _, d in k8s_documents()
    )
    assert "activationValue" in spec["triggers"][0]["metadata"]


def test_trigger_authentication_reads_the_management_url_from_a_secret() -> None:
    _, auth = keda_objects()
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "host"
    secret = next(s for s in by_kind("Secret") if s["metadata"]["name"] == ref["name"])
    url = secret["stringData"][ref["key"]]
    assert url.startswith("http://")
    assert "@" in url
    assert url.endswith(":15672/")


def test_keda_manifest_is_what_proxymq_keda_prints() -> None:
    text = (K8S / "url-fetcher-keda.yaml").read_text()
    assert text == keda.render(keda.Scaling("url-fetcher")), (
        "regenerate: proxymq keda --service url-fetcher"
    )
    assert list(yaml.safe_load_all(text)) == keda.manifests(keda.Scaling("url-fetcher"))
