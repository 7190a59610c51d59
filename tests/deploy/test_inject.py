"""`proxymq inject`: adds the native dequeuer sidecar, is idempotent, keeps what it does not own
(comments, unknown fields, a user's own settings), leaves other kinds alone, and its output is a
valid Kubernetes object."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.cli import inject
from shared.cli.inject import InjectError, Injection, inject_text
from tests.deploy.support import latest_k8s_version, validate_k8s

PROXYMQ = str(Path(sys.executable).with_name("proxymq"))
VERSION = "1.29.0"

SAMPLE = """\
# fetches pages; owned by team web
apiVersion: apps/v1
kind: Deployment
metadata:
  name: url-fetcher
  annotations:
    example.com/owner: web # who to call
spec:
  replicas: 2
  selector:
    matchLabels:
      app: url-fetcher
  template:
    metadata:
      labels:
        app: url-fetcher
    spec:
      terminationGracePeriodSeconds: 30 # the default, too short for the drain
      containers:
        - name: url-fetcher # the microservice itself
          image: proxymq/url-fetcher:0.1.0
          ports:
            - containerPort: 8000
          env:
            - name: PROXYMQ_HOST
              value: "127.0.0.1"
---
apiVersion: v1
kind: Service # passes through untouched
metadata:
  name: web
spec:
  selector:
    app: web
  ports:
    - port: 80
      targetPort: 8080
"""

KUBECTL_STYLE = """\
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: worker
spec:
  serviceName: worker
  selector:
    matchLabels:
      app: worker
  template:
    metadata:
      labels:
        app: worker
    spec:
      containers:
      - image: example/worker:1
        name: worker
        ports:
        - containerPort: 9000
          name: http
"""


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def pod(document: dict[str, Any]) -> dict[str, Any]:
    spec = document["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def dequeuer(document: dict[str, Any]) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        c for c in pod(document).get("initContainers", []) if c["name"] == "proxymq-dequeuer"
    ]
    assert len(found) == 1, found
    return found[0]


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def run_cli(stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROXYMQ, "inject", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_adds_a_native_sidecar_that_validates() -> None:
    out, report = inject_text(SAMPLE, Injection("url-fetcher", target_port=8000))
    deployment, service = documents(out)
    sidecar = dequeuer(deployment)
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == inject.DEFAULT_IMAGE
    variables = env(sidecar)
    assert variables["PROXYMQ_SERVICE"] == "url-fetcher"
    assert variables["PROXYMQ_TARGET"] == "http://127.0.0.1:8000"
    assert variables["PROXYMQ_PARTITIONS"] == "8"
    assert variables["PROXYMQ_AMQP_URL_FILE"] == "/var/run/secrets/proxymq/amqp-url"
    assert "PROXYMQ_AMQP_URL" not in variables
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["ports"] == [{"name": "proxymq-admin", "containerPort": 9081}]
    volume = next(v for v in pod(deployment)["volumes"] if v["name"] == "proxymq-amqp")
    assert volume["secret"]["secretName"] == "proxymq-amqp"
    assert pod(deployment)["terminationGracePeriodSeconds"] == inject.required_grace() >= 45
    assert report.injected == ["Deployment/url-fetcher"]
    assert any("preStop" in note for note in report.notes), "it warns about the stop order"
    for document in (deployment, service):
        validate_k8s(document, VERSION, strict=True)


def test_is_idempotent() -> None:
    once, _ = inject_text(SAMPLE, Injection("url-fetcher"))
    twice, _ = inject_text(once, Injection("url-fetcher"))
    assert twice == once
    kubectl_once, _ = inject_text(KUBECTL_STYLE, Injection("worker"))
    assert inject_text(kubectl_once, Injection("worker"))[0] == kubectl_once


def test_keeps_comments_unknown_fields_and_other_kinds() -> None:
    text = SAMPLE.replace(
        "      containers:\n", "      someFutureField: {keep: me} # not ours\n      containers:\n"
    )
    out, _ = inject_text(text, Injection("url-fetcher"))
    for comment in (
        "# fetches pages; owned by team web",
        "# who to call",
        "# the microservice itself",
        "# passes through untouched",
        "# not ours",
    ):
        assert comment in out, comment
    deployment, service = documents(out)
    assert pod(deployment)["someFutureField"] == {"keep": "me"}
    assert deployment["metadata"]["annotations"] == {"example.com/owner": "web"}
    assert service == documents(SAMPLE)[1]
    validate_k8s(deployment, VERSION, strict=False)  # the unknown field is allowed


def test_keeps_the_inputs_indentation_style() -> None:
    out, _ = inject_text(KUBECTL_STYLE, Injection("worker"))
    assert "      containers:\n      - image: example/worker:1\n" in out
    assert "      initContainers:\n      - name: proxymq-dequeuer\n" in out
    (statefulset,) = documents(out)
    assert (
        env(dequeuer(statefulset))["PROXYMQ_TARGET"] == "http://127.0.0.1:9000"
    )  # first containerPort
    validate_k8s(statefulset, VERSION, strict=True)


def test_updates_an_existing_sidecar_and_keeps_the_users_tuning() -> None:
    first, _ = inject_text(SAMPLE, Injection("url-fetcher"))
    tuned = first.replace(
        "            - name: PROXYMQ_SERVICE\n",
        "            - name: PROXYMQ_CONCURRENCY # tuned by hand\n              value: '128'\n"
        "            - name: PROXYMQ_SERVICE\n",
    ).replace("cpu: 50m", "cpu: 500m")
    out, _ = inject_text(
        tuned, Injection("url-fetcher", image="registry.example/dequeuer:2", partitions=16)
    )
    (deployment, _) = documents(out)
    sidecar = dequeuer(deployment)
    assert sidecar["image"] == "registry.example/dequeuer:2"
    variables = env(sidecar)
    assert variables["PROXYMQ_CONCURRENCY"] == "128"
    assert variables["PROXYMQ_PARTITIONS"] == "16"
    assert sidecar["resources"]["requests"]["cpu"] == "500m"
    assert "# tuned by hand" in out


def test_a_sidecar_with_its_own_amqp_url_is_not_given_the_file_as_well() -> None:
    """A dequeuer given both PROXYMQ_AMQP_URL and PROXYMQ_AMQP_URL_FILE refuses to start: a
    sidecar already setting the URL (written by hand, from a Secret of its own) got the file
    beside it, and the injected pod never became ready."""
    first, _ = inject_text(SAMPLE, Injection("url-fetcher"))
    own = first.replace(
        "            - name: PROXYMQ_SERVICE\n",
        "            - name: PROXYMQ_AMQP_URL\n"
        "              valueFrom: {secretKeyRef: {name: mine, key: url}}\n"
        "            - name: PROXYMQ_SERVICE\n",
    )
    assert own != first
    out, report = inject_text(own, Injection("url-fetcher"))
    (deployment, _) = documents(out)
    variables = env(dequeuer(deployment))
    assert "PROXYMQ_AMQP_URL" not in variables
    assert variables["PROXYMQ_AMQP_URL_FILE"] == "/var/run/secrets/proxymq/amqp-url"
    assert any("PROXYMQ_AMQP_URL" in note and "proxymq-amqp" in note for note in report.notes)
    assert inject_text(out, Injection("url-fetcher"))[0] == out


def test_grace_period_is_raised_never_lowered() -> None:
    longer = SAMPLE.replace(
        "terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: 120"
    )
    (deployment, _) = documents(inject_text(longer, Injection("url-fetcher"))[0])
    assert pod(deployment)["terminationGracePeriodSeconds"] == 120
    missing = SAMPLE.replace(
        "      terminationGracePeriodSeconds: 30 # the default, too short for the drain\n", ""
    )
    (deployment, _) = documents(inject_text(missing, Injection("url-fetcher"))[0])
    assert pod(deployment)["terminationGracePeriodSeconds"] == inject.required_grace()


def test_grace_period_follows_the_sidecars_own_shutdown_grace() -> None:
    """A user's PROXYMQ_SHUTDOWN_GRACE is kept on re-injection; the pod's grace must cover that
    drain (docs/operations.md: raise both together, grace + 20 s), not the default one."""
    first, _ = inject_text(SAMPLE, Injection("url-fetcher"))
    tuned = first.replace(
        "            - name: PROXYMQ_SERVICE\n",
        "            - name: PROXYMQ_SHUTDOWN_GRACE\n              value: '60'\n"
        "            - name: PROXYMQ_SERVICE\n",
    )
    (deployment, _) = documents(inject_text(tuned, Injection("url-fetcher"))[0])
    assert env(dequeuer(deployment))["PROXYMQ_SHUTDOWN_GRACE"] == "60"
    assert pod(deployment)["terminationGracePeriodSeconds"] == 60 + inject.GRACE_MARGIN
    fractional = tuned.replace("value: '60'", "value: '60.5'")
    (deployment, _) = documents(inject_text(fractional, Injection("url-fetcher"))[0])
    assert pod(deployment)["terminationGracePeriodSeconds"] == 61 + inject.GRACE_MARGIN


def test_moves_an_old_regular_container_sidecar_into_init_containers() -> None:
    legacy = SAMPLE.replace(
        "      containers:\n",
        "      containers:\n"
        "        - name: proxymq-dequeuer\n"
        "          image: proxymq/dequeuer:0.0.1\n",
    )
    (deployment, _) = documents(inject_text(legacy, Injection("url-fetcher"))[0])
    assert [c["name"] for c in pod(deployment)["containers"]] == ["url-fetcher"]
    assert dequeuer(deployment)["image"] == inject.DEFAULT_IMAGE


def test_injects_inside_a_list_and_after_existing_init_containers() -> None:
    (deployment, _) = documents(SAMPLE)
    pod(deployment)["initContainers"] = [{"name": "migrate", "image": "example/migrate:1"}]
    listing = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [deployment]})
    (result,) = documents(inject_text(listing, Injection("url-fetcher"))[0])
    names = [c["name"] for c in pod(result["items"][0])["initContainers"]]
    assert names == ["migrate", "proxymq-dequeuer"]


def test_refuses_invalid_yaml_and_workloads_without_a_pod_template() -> None:
    with pytest.raises(InjectError, match="not valid YAML"):
        inject_text("kind: Deployment\n  bad: [", Injection("x"))
    with pytest.raises(InjectError, match="no pod template"):
        inject_text(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {}\n", Injection("x")
        )


def shaped(pod_spec: str) -> str:
    return f"kind: Deployment\nmetadata: {{name: web}}\nspec: {{template: {{spec: {pod_spec}}}}}\n"


POD = "spec.template.spec"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("kind: Deployment\nmetadata: foo\n", "document 1: metadata is a string, not a mapping"),
        ("a: 1\n---\nkind: List\nitems: 5\n", "document 2: items is a number, not a list"),
        (
            "kind: List\nitems: [{kind: Deployment, metadata: [x]}]\n",
            "document 1: items[0].metadata is a list, not a mapping",
        ),
        ("kind: Deployment\nmetadata: {name: web}\nspec: 5\n", "web: spec is a number, not"),
        (shaped("{containers: 5}"), f"web: {POD}.containers is a number, not a list"),
        (shaped('{containers: ["abc"]}'), f"web: {POD}.containers[0] is a string, not a mapping"),
        (
            shaped('{containers: [{name: a, ports: "x"}]}'),
            f"web: {POD}.containers[0].ports is a string, not a list",
        ),
        (
            shaped('{containers: [{name: a, ports: ["x"]}]}'),
            f"web: {POD}.containers[0].ports[0] is a string, not a mapping",
        ),
        (
            shaped('{containers: [{name: a, lifecycle: "x"}]}'),
            f"web: {POD}.containers[0].lifecycle is a string, not a mapping",
        ),
        (
            shaped('{containers: [{name: a}], initContainers: ["x"]}'),
            f"web: {POD}.initContainers[0] is a string, not a mapping",
        ),
        (
            shaped('{containers: [{name: a}], initContainers: "x"}'),
            f"web: {POD}.initContainers is a string, not a list",
        ),
        (
            shaped('{containers: [{name: a}], volumes: ["x"]}'),
            f"web: {POD}.volumes[0] is a string, not a mapping",
        ),
        (
            "kind: List\nitems: [{kind: Deployment, spec: {template: {spec: {containers: [1]}}}}]",
            f"Deployment/? (document 1: items[0]): {POD}.containers[0] is a number, not a mapping",
        ),
    ],
)
def test_a_field_of_the_wrong_shape_is_named_by_its_path(text: str, problem: str) -> None:
    with pytest.raises(InjectError) as raised:
        inject_text(text, Injection("x"))
    assert problem in str(raised.value)
    assert "\n" not in str(raised.value)


def test_null_lists_are_absent_ones_and_non_mappings_in_a_list_pass_through() -> None:
    moved = shaped("{containers: [{name: a}, {name: proxymq-dequeuer}], initContainers: null}")
    (deployment,) = documents(inject_text(moved, Injection("x"))[0])
    assert [c["name"] for c in pod(deployment)["containers"]] == ["a"]
    assert dequeuer(deployment)["image"] == inject.DEFAULT_IMAGE
    listing = "kind: List\nitems: [3, null]\n"
    assert documents(inject_text(listing, Injection("x"))[0]) == documents(listing)


def test_cli_round_trip_as_a_user_runs_it() -> None:
    result = run_cli(
        SAMPLE, "--service", "url-fetcher", "--target-port", "8000", "--ready-path", "/healthz"
    )
    assert result.returncode == 0, result.stderr
    assert "Deployment/url-fetcher" in result.stderr
    deployment, _ = documents(result.stdout)
    assert env(dequeuer(deployment))["PROXYMQ_READY_PATH"] == "/healthz"
    validate_k8s(deployment, latest_k8s_version(), strict=True)
    again = run_cli(
        result.stdout,
        "--service",
        "url-fetcher",
        "--target-port",
        "8000",
        "--ready-path",
        "/healthz",
    )
    assert again.stdout == result.stdout


def test_cli_errors_are_clear() -> None:
    bad = run_cli("a: [1,\n", "--service", "url-fetcher")
    assert bad.returncode == 1
    assert "stdin is not valid YAML" in bad.stderr
    assert not bad.stdout
    dotted = run_cli(SAMPLE, "--service", "a.b")
    assert dotted.returncode == 2
    assert "service name" in dotted.stderr
    shape = run_cli(shaped('{containers: ["abc"]}'), "--service", "x")
    assert shape.returncode == 1, "bad input, as invalid YAML"
    assert shape.stderr == (
        f"proxymq inject: Deployment/web: {POD}.containers[0] is a string, not a mapping\n"
    )
    assert not shape.stdout
    port = run_cli(SAMPLE, "--service", "x", "--target-port", "70000")
    assert port.returncode == 2
    assert "TCP port" in port.stderr


def test_the_injected_sidecar_matches_the_checked_in_manifest() -> None:
    """deploy/k8s/url-fetcher.yaml and `proxymq inject` describe the same sidecar: same
    probes, ports and secret path, so the docs' two routes give the same pod."""
    from tests.deploy.support import by_kind

    manifest = next(d for d in by_kind("Deployment") if d["metadata"]["name"] == "url-fetcher")
    ours = dequeuer(manifest)
    (injected, _) = documents(inject_text(SAMPLE, Injection("url-fetcher"))[0])
    theirs = dequeuer(injected)
    for key in (
        "restartPolicy",
        "ports",
        "startupProbe",
        "livenessProbe",
        "readinessProbe",
        "volumeMounts",
    ):
        assert ours[key] == theirs[key], key
    shared = env(ours).keys() & env(theirs).keys()
    assert {k: env(ours)[k] for k in shared} == {k: env(theirs)[k] for k in shared}


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            SAMPLE.replace("replicas: 2", "replicas: {{ .Values.replicas }}"),
            "document 1: spec.replicas",
        ),
        ("kind: ConfigMap\ndata:\n  x: {{ .Values.x }}\n", "document 1: data.x"),
        ("a: 1\n---\nkind: List\nitems: [{{ x }}]\n", "document 2: items[0]"),
    ],
)
def test_an_unrendered_helm_template_is_refused_not_rewritten(text: str, where: str) -> None:
    """`replicas: {{ .Values.replicas }}` is valid YAML (a mapping as a mapping's key): it came
    out as `{{.Values.replicas: null}: null}`, exit 0, a template that no longer renders."""
    result = run_cli(text, "--service", "x")
    assert result.returncode == 1
    assert not result.stdout
    assert result.stderr.startswith(f"proxymq inject: {where} has a key that is a mapping")
    assert "helm template" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("depth", [300, 5000])
def test_deeply_nested_yaml_is_one_line(depth: int) -> None:
    """`a: [[[[...]]]]` a few hundred levels deep gave a RecursionError traceback."""
    result = run_cli(f"a: {'[' * depth}{']' * depth}\n", "--service", "x")
    assert result.returncode == 1
    assert not result.stdout
    assert result.stderr == f"proxymq inject: {inject.TOO_DEEP}\n"


@pytest.mark.parametrize(
    ("text", "options"),
    [
        (SAMPLE.replace("containerPort: 8000", "containerPort: 9081"), []),
        (SAMPLE, ["--target-port", "9081"]),
        (
            SAMPLE.replace(
                "            - containerPort: 8000",
                "            - containerPort: 8000\n            - containerPort: 9081",
            ),
            [],
        ),
    ],
)
def test_a_container_on_the_dequeuers_admin_port_is_refused(text: str, options: list[str]) -> None:
    """A microservice listening on 9081 (or --target-port 9081) got a sidecar whose admin port
    is 9081 too: the dequeuer could not bind it, or called itself as the microservice, and its
    probes asked the microservice; inject wrote that pod out with exit 0."""
    result = run_cli(text, "--service", "url-fetcher", *options)
    assert result.returncode == 1, result.stderr
    assert "9081" in result.stderr and "admin port" in result.stderr
    assert not result.stdout


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (["--image", ""], "--image '' is no image name"),
        (["--image", "proxymq/dequeuer:0.1.0 "], "--image 'proxymq/dequeuer:0.1.0 ' is no"),
        (["--amqp-secret", "Proxymq_AMQP"], "--amqp-secret 'Proxymq_AMQP' is not a Kubernetes"),
        (["--amqp-secret", ""], "--amqp-secret '' is not a Kubernetes name"),
    ],
)
def test_an_image_or_secret_kubernetes_would_refuse_is_a_usage_error(
    options: list[str], said: str
) -> None:
    """An empty image or a Secret name that is no DNS-1123 subdomain made a pod the API server
    refuses (or, with a newline, YAML that no longer parses), exit 0."""
    result = run_cli(SAMPLE, "--service", "url-fetcher", *options)
    assert result.returncode == 2, result.stderr
    assert said in result.stderr
    assert not result.stdout


def test_a_pod_whose_only_container_is_the_dequeuer_is_refused() -> None:
    """It got a second proxymq-dequeuer as a native sidecar beside the first, and no
    microservice for either to call."""
    alone = shaped("{containers: [{name: proxymq-dequeuer, image: 'proxymq/dequeuer:0.1.0'}]}")
    result = run_cli(alone, "--service", "web")
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("proxymq inject: Deployment/web: ")
    assert "no container but proxymq-dequeuer" in result.stderr
    assert not result.stdout


def test_the_amqp_secret_is_readable_by_the_sidecar_alone_as_in_the_manifest() -> None:
    """The injected Secret volume had Kubernetes' default mode 0644: the AMQP URL, password
    included, readable by every process of the pod. deploy/k8s mounts it 0440 for the pod's
    fsGroup, which the sidecar's process is in; inject does the same, and keeps a user's own
    fsGroup (every container of the pod is in it)."""
    from tests.deploy.support import by_kind

    manifest = next(d for d in by_kind("Deployment") if d["metadata"]["name"] == "url-fetcher")
    (injected, _) = documents(inject_text(SAMPLE, Injection("url-fetcher"))[0])

    def secret_volume(document: dict[str, Any]) -> dict[str, Any]:
        return next(v for v in pod(document)["volumes"] if v["name"] == "proxymq-amqp")

    assert secret_volume(injected)["secret"]["defaultMode"] == 0o440
    assert secret_volume(manifest)["secret"]["defaultMode"] == 0o440
    fs_group = pod(injected)["securityContext"]["fsGroup"]
    assert fs_group == pod(manifest)["securityContext"]["fsGroup"] == inject.SIDECAR_UID
    validate_k8s(injected, VERSION, strict=True)

    (deployment, _) = documents(SAMPLE)
    pod(deployment)["securityContext"] = {"fsGroup": 2000, "runAsNonRoot": True}
    (kept,) = documents(inject_text(yaml.safe_dump(deployment), Injection("url-fetcher"))[0])
    assert pod(kept)["securityContext"] == {"fsGroup": 2000, "runAsNonRoot": True}
    assert secret_volume(kept)["secret"]["defaultMode"] == 0o440


def test_drain_hook_gives_the_pod_the_hook_of_the_manifest() -> None:
    """deploy/k8s/url-fetcher.yaml drains the dequeuer before its microservice stops (a preStop
    running drain.py, which asks it over the pod's loopback); inject added no such hook, so the
    microservice stopped first under the requests the dequeuer held."""
    from tests.deploy.support import by_kind

    manifest = next(d for d in by_kind("Deployment") if d["metadata"]["name"] == "url-fetcher")
    (theirs,) = [c for c in pod(manifest)["containers"] if c["name"] == "url-fetcher"]
    (injected, _) = documents(inject_text(SAMPLE, Injection("url-fetcher", drain_hook=True))[0])
    (ours,) = [c for c in pod(injected)["containers"] if c["name"] == "url-fetcher"]
    assert ours["lifecycle"]["preStop"] == theirs["lifecycle"]["preStop"]
    for spec in (pod(injected), pod(manifest)):
        assert "shareProcessNamespace" not in spec, "the hook asks over the loopback"
    validate_k8s(injected, VERSION, strict=True)

    own = SAMPLE.replace(
        "          ports:\n",
        "          lifecycle:\n            preStop:\n              exec:\n"
        "                command: [/bin/drain]\n          ports:\n",
        1,
    )
    (kept, _) = documents(inject_text(own, Injection("url-fetcher", drain_hook=True))[0])
    assert pod(kept)["containers"][0]["lifecycle"]["preStop"] == {
        "exec": {"command": ["/bin/drain"]}
    }

    result = run_cli(SAMPLE, "--service", "url-fetcher")  # the default: most images lack drain.py
    assert result.returncode == 0, result.stderr
    (without, _) = documents(result.stdout)
    assert "lifecycle" not in pod(without)["containers"][0]
    assert "shareProcessNamespace" not in pod(without)
    assert "no preStop hook" in result.stderr
    hooked = run_cli(SAMPLE, "--service", "url-fetcher", "--drain-hook")
    assert hooked.returncode == 0, hooked.stderr
    assert "drain.py" in hooked.stdout and "needs Python" in hooked.stderr
    assert "uid" not in hooked.stderr, "the hook needs no user of the sidecar's"


def test_a_shared_process_namespace_is_no_longer_added_and_is_pointed_out() -> None:
    """The drain hook used to find and signal the dequeuer through `shareProcessNamespace:
    true`, which let the microservice's container (of the sidecar's uid) read the dequeuer's
    environment and files, the AMQP URL among them. It asks over the loopback now: a pod
    injected before, or shared for reasons of its own, keeps the field, with a note."""
    (deployment, _) = documents(SAMPLE)
    pod(deployment)["shareProcessNamespace"] = True
    shared = yaml.safe_dump(deployment)
    for args in ([], ["--drain-hook"]):
        result = run_cli(shared, "--service", "url-fetcher", *args)
        assert result.returncode == 0, result.stderr
        (injected,) = documents(result.stdout)
        assert pod(injected)["shareProcessNamespace"] is True, "a user's field is kept"
        assert "shareProcessNamespace is true" in result.stderr, args
        assert "AMQP URL" in result.stderr
    result = run_cli(SAMPLE, "--service", "url-fetcher", "--drain-hook")
    assert "shareProcessNamespace" not in result.stdout + result.stderr
