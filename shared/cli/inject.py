"""`proxymq inject --service S`: add the dequeuer sidecar to the Kubernetes workloads on stdin.

    kubectl get deploy url-fetcher -o yaml \
        | proxymq inject --service url-fetcher | kubectl apply -f -

Like `linkerd inject`: every Deployment, StatefulSet, DaemonSet and ReplicaSet (also inside a
`kind: List`) gets a `proxymq-dequeuer` native sidecar, an init container with
`restartPolicy: Always`, so the kubelet starts it before the microservice and stops it after.
Everything else passes through. The YAML is edited round-trip (ruamel.yaml): comments, key order,
quoting and fields this command does not know survive. Running it again gives the same output:
an existing `proxymq-dequeuer` is updated in place, environment variables a user added to it
(say `PROXYMQ_CONCURRENCY`) and its resources are kept.

What the sidecar gets: `PROXYMQ_SERVICE`, `PROXYMQ_TARGET=http://127.0.0.1:PORT`,
`PROXYMQ_PARTITIONS`, the AMQP URL as a file from a Secret (`PROXYMQ_AMQP_URL_FILE`, never in the
environment or on a command line; mode 0440 for the pod's fsGroup), the pod name as instance
id, and probes on admin port 9081: `/healthz` for startup and liveness, `/readyz` for
readiness. The startup probe must not be `/readyz`: a native sidecar's startup probe gates the
main containers, and the dequeuer is only ready once the microservice answers, so waiting for
`/readyz` would never start it.
`terminationGracePeriodSeconds` is raised to what the dequeuer's drain needs: its
PROXYMQ_SHUTDOWN_GRACE (a user's own value included) plus GRACE_MARGIN. With --drain-hook, as
in deploy/k8s, the microservice's container gets a preStop hook running drain.py, which makes
the dequeuer drain before the microservice stops (`POST /drain` on its admin port, over the
pod's loopback: no shared process namespace, no common user; a container's own preStop is
kept). It is not the default: the hook needs Python and drain.py in the microservice's image,
which a user's image seldom has.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import math
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dequeuer.settings import DequeuerSettings
from shared import topology
from shared.cli.common import add_setting
from shared.cli.keda import SECRET_NAME_LIMIT, check_kubernetes_name

if TYPE_CHECKING:
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

CONTAINER = "proxymq-dequeuer"
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"})
DEFAULT_IMAGE = "proxymq/dequeuer:0.1.0"
DEFAULT_TARGET_PORT = 8000
ADMIN_PORT: int = DequeuerSettings.model_fields["admin_port"].default
ADMIN_PORT_NAME = "proxymq-admin"
AMQP_VOLUME = "proxymq-amqp"
AMQP_SECRET = "proxymq-amqp"
AMQP_SECRET_KEY = "amqp-url"
SECRET_DIR = "/var/run/secrets/proxymq"
DRAIN_SCRIPT = "/usr/local/lib/proxymq/drain.py"  # in every proxymq image
SIDECAR_UID = 10001
SECRET_MODE = 0o440  # owner and the pod's fsGroup: read only
# The dequeuer's drain (PROXYMQ_SHUTDOWN_GRACE) plus leaving the group and closing its
# channels (5 s), the microservice's own stop afterwards (10 s) and slack (5 s).
GRACE_MARGIN = 20
_SEQUENCE_ITEM = re.compile(r"^(\s*)- ")
TOO_DEEP = "stdin is nested too deeply to be read as YAML (no Kubernetes object is)"


class InjectError(Exception):
    """Input that cannot be injected: invalid YAML, a workload without a pod template, a field
    of the wrong shape."""


@dataclass(frozen=True)
class At:
    """Where a node is in the input (`Deployment/web: spec.template.spec`), so that a field of
    the wrong shape is named by its path instead of failing as a traceback further in."""

    owner: str
    path: str = ""

    def child(self, key: str | int) -> At:
        step = f"[{key}]" if isinstance(key, int) else f".{key}" if self.path else key
        return At(self.owner, self.path + step)

    def __str__(self) -> str:
        return f"{self.owner}: {self.path}" if self.path else self.owner


def mapping(node: CommentedMap, key: str, at: At) -> CommentedMap | None:
    """`node[key]`, a mapping, or None when it is absent or null; else InjectError."""
    from ruamel.yaml.comments import CommentedMap

    value = node.get(key)
    if value is None or isinstance(value, CommentedMap):
        return value
    raise InjectError(f"{at.child(key)} is {describe(value)}, not a mapping")


def mappings(node: CommentedMap, key: str, at: At) -> CommentedSeq | None:
    """`node[key]`, a list of mappings, or None when it is absent or null; else InjectError
    naming the list or its first entry that is no mapping."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    value = node.get(key)
    if value is None:
        return None
    if not isinstance(value, CommentedSeq):
        raise InjectError(f"{at.child(key)} is {describe(value)}, not a list")
    for index, entry in enumerate(value):
        if not isinstance(entry, CommentedMap):
            raise InjectError(f"{at.child(key).child(index)} is {describe(entry)}, not a mapping")
    return value


def describe(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


@dataclass(frozen=True)
class Injection:
    service: str
    target_port: int | None = None
    image: str = DEFAULT_IMAGE
    partitions: int = 8
    amqp_secret: str = AMQP_SECRET
    ready_path: str | None = None
    drain_hook: bool = False

    def __post_init__(self) -> None:
        topology.check_service_name(self.service)
        if self.target_port is not None and not 1 <= self.target_port <= 65535:
            raise ValueError(f"--target-port {self.target_port} is not a TCP port")
        if not 1 <= self.partitions <= 1024:
            raise ValueError(f"--partitions must be between 1 and 1024, not {self.partitions}")
        if not self.image or any(c.isspace() for c in self.image):
            raise ValueError(
                f"--image {self.image!r} is no image name: Kubernetes refuses an empty one or "
                "one with whitespace"
            )
        check_kubernetes_name(self.amqp_secret, "--amqp-secret", SECRET_NAME_LIMIT)


def required_grace(sidecar: Mapping[str, object] | None = None) -> int:
    """Seconds a pod needs to stop cleanly; follows the dequeuer's own shutdown grace: the
    sidecar's PROXYMQ_SHUTDOWN_GRACE when it sets one (a user's, kept on re-injection), else
    the default."""
    grace = float(DequeuerSettings.model_fields["shutdown_grace"].default)
    for entry in (sidecar or {}).get("env") or []:  # type: ignore[attr-defined]
        if isinstance(entry, Mapping) and entry.get("name") == "PROXYMQ_SHUTDOWN_GRACE":
            with contextlib.suppress(ValueError):  # not a number: the dequeuer refuses it
                grace = float(str(entry.get("value")))
    if not 0 <= grace < math.inf:
        grace = float(DequeuerSettings.model_fields["shutdown_grace"].default)
    return math.ceil(grace) + GRACE_MARGIN


@dataclass
class Report:
    """What happened, for the summary on stderr (stdout carries only YAML)."""

    injected: list[str]
    notes: list[str]


def inject_text(text: str, injection: Injection) -> tuple[str, Report]:
    """Inject every workload of a YAML stream; raise InjectError on YAML that does not parse."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    yaml = YAML()  # round-trip: comments, order and quoting are kept
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long strings
    try:
        loaded = list(yaml.load_all(text))
    except YAMLError as exc:
        problem = str(exc).replace('"<unicode string>"', "stdin")
        raise InjectError(f"stdin is not valid YAML: {problem}") from None
    except RecursionError:  # ruamel.yaml recurses per level: "[[[[..." 250 deep exhausts it
        raise InjectError(TOO_DEEP) from None
    documents = [d for d in loaded if d is not None]
    report = Report([], [])
    for number, document in enumerate(loaded, 1):
        plain_keys(document, At(f"document {number}"))
    for number, document in enumerate(loaded, 1):
        for workload, at in workloads(document, At(f"document {number}")):
            inject_workload(workload, at, injection, report)
    indent, offset = guess_indent(text)
    yaml.indent(mapping=indent, sequence=offset + 2, offset=offset)
    yaml.explicit_start = len(documents) > 1 or bool(re.search(r"(?m)^---", text))
    out = io.StringIO()
    yaml.dump_all(documents, out)
    return out.getvalue(), report


def plain_keys(node: object, at: At) -> None:
    """InjectError at the first key that is a mapping or a list. Kubernetes has none, but an
    unrendered Helm template has one: `replicas: {{ .Values.n }}` is valid YAML, a mapping with
    a mapping as its key, and would be written back as `{{.Values.n: null}: null}`."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if isinstance(key, Mapping | tuple | list):
                raise InjectError(
                    f"{at} has a key that is a mapping or a list, as an unquoted {{{{ ... }}}} "
                    "makes: render templates first (helm template CHART | proxymq inject ...)"
                )
            plain_keys(value, at.child(str(key)))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            plain_keys(item, at.child(index))


def workloads(document: object, at: At) -> Iterator[tuple[CommentedMap, At]]:
    """The workloads of one document, with where each is: itself, or the items of a
    `kind: List`. Items that are no mapping are not workloads and pass through."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if not isinstance(document, CommentedMap):
        return
    kind = document.get("kind")
    if kind == "List" or str(kind).endswith("List"):
        items = document.get("items")
        if items is not None and not isinstance(items, CommentedSeq):
            raise InjectError(f"{at.child('items')} is {describe(items)}, not a list")
        for index, item in enumerate(items or []):
            yield from workloads(item, at.child("items").child(index))
    elif kind in WORKLOAD_KINDS:
        yield document, at


def inject_workload(workload: CommentedMap, at: At, injection: Injection, report: Report) -> None:
    """Errors name the workload, and where it is in the input when it has no name."""
    metadata = mapping(workload, "metadata", at)
    given = metadata.get("name") if metadata is not None else None
    name = f"{workload['kind']}/{given}" if given is not None else f"{workload['kind']}/? ({at})"
    pod = pod_spec(workload, At(name))
    port = injection.target_port or first_container_port(pod) or DEFAULT_TARGET_PORT
    check_admin_port(pod, port, name)
    added = add_sidecar(pod, sidecar(injection, port), name)
    if drop_own_amqp_url(added):
        report.notes.append(
            f"{name}: {CONTAINER}'s own PROXYMQ_AMQP_URL is removed: the URL now comes from "
            f"Secret {injection.amqp_secret} (PROXYMQ_AMQP_URL_FILE), and a dequeuer given both "
            "refuses to start"
        )
    ensure_volume(pod, injection.amqp_secret, At(name).child("spec.template.spec"))
    grace = pod.get("terminationGracePeriodSeconds")
    if not isinstance(grace, int) or grace < required_grace(added):
        pod["terminationGracePeriodSeconds"] = required_grace(added)
    report.injected.append(name)
    if pod.get("shareProcessNamespace") is True:
        report.notes.append(
            f"{name}: shareProcessNamespace is true: its containers of uid {SIDECAR_UID} (the "
            "sidecar's) or root can read the dequeuer's environment and files, the AMQP URL "
            "among them; the drain hook no longer needs it, remove it unless something else does"
        )
    main = target_container(pod, port)
    if main is None or (main.get("lifecycle") or {}).get("preStop"):
        return
    if not injection.drain_hook:
        report.notes.append(
            f"{name}: container {main.get('name')!r} has no preStop hook. Kubernetes stops the "
            "sidecar only after it, so requests the dequeuer still holds when it exits fail; "
            "give it a preStop that lets the dequeuer drain first (docs/deploy.md#draining)"
        )
        return
    add_drain_hook(main)
    report.notes.append(
        f"{name}: container {main.get('name')!r} gets the preStop hook `python {DRAIN_SCRIPT}` "
        "(docs/deploy.md#draining): its image needs Python and that file (proxymq's images "
        "have both: deploy/docker/drain.py)"
    )


def drop_own_amqp_url(container: CommentedMap) -> bool:
    """Whether the sidecar had a PROXYMQ_AMQP_URL of its own, now removed: kept beside the
    injected PROXYMQ_AMQP_URL_FILE, the dequeuer refused to start (which of two URLs to use is
    not to be guessed)."""
    variables = container["env"]
    own = [
        i
        for i, e in enumerate(variables)
        if isinstance(e, dict) and e.get("name") == "PROXYMQ_AMQP_URL"
    ]
    for index in reversed(own):
        del variables[index]
    return bool(own)


def add_drain_hook(main: CommentedMap) -> None:
    """What deploy/k8s gives url-fetcher: the dequeuer drains before its microservice gets
    SIGTERM (Kubernetes stops a native sidecar after the main containers, the wrong order for
    a consumer). drain.py asks it over the pod's loopback, on the admin port the sidecar is
    given (ADMIN_PORT, drain.py's default)."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    lifecycle = main.get("lifecycle")
    if lifecycle is None:  # pod_spec checked it is a mapping when present
        lifecycle = main["lifecycle"] = CommentedMap()
    command = CommentedSeq(["python", DRAIN_SCRIPT])
    command.fa.set_flow_style()
    lifecycle["preStop"] = CommentedMap([("exec", CommentedMap([("command", command)]))])


def pod_spec(workload: CommentedMap, at: At) -> CommentedMap:
    """The pod template's spec, with every list this command reads or extends checked to be a
    list of mappings, so the edits below need no checks of their own."""
    spec = mapping(workload, "spec", at)
    template = mapping(spec, "template", at.child("spec")) if spec is not None else None
    pod = mapping(template, "spec", at.child("spec.template")) if template is not None else None
    if pod is None or pod.get("containers") is None:
        raise InjectError(f"{at} has no pod template with containers (spec.template.spec)")
    at = at.child("spec.template.spec")
    for key in ("containers", "initContainers"):
        for index, container in enumerate(mappings(pod, key, at) or []):
            mappings(container, "ports", at.child(key).child(index))
            mapping(container, "lifecycle", at.child(key).child(index))
    mappings(pod, "volumes", at)
    return pod


def check_admin_port(pod: CommentedMap, target: int, name: str) -> None:
    """The pod's containers share one network: a container already on the dequeuer's admin
    port keeps the dequeuer from binding it (or answers its probes), and a target on it makes
    the dequeuer call itself."""
    problem = "is the dequeuer's admin port, and a pod's containers share one network"
    if target == ADMIN_PORT:
        raise InjectError(f"{name}: the microservice's port {target} {problem}")
    for key in ("containers", "initContainers"):
        for container in pod.get(key) or []:
            if container.get("name") == CONTAINER:
                continue
            for port in container.get("ports") or []:
                if port.get("containerPort") == ADMIN_PORT:
                    raise InjectError(
                        f"{name}: container {container.get('name')!r} declares port "
                        f"{ADMIN_PORT}, which {problem}"
                    )


def first_container_port(pod: CommentedMap) -> int | None:
    for container in pod["containers"]:
        for port in container.get("ports") or []:
            if isinstance(port.get("containerPort"), int):
                return int(port["containerPort"])
    return None


def target_container(pod: CommentedMap, port: int) -> CommentedMap | None:
    """The container the dequeuer calls: the one declaring the port, else the first."""
    containers = list(pod["containers"])
    for container in containers:
        if any(p.get("containerPort") == port for p in container.get("ports") or []):
            return container  # type: ignore[no-any-return]
    return containers[0] if containers else None


def sidecar(injection: Injection, port: int) -> CommentedMap:
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    def m(*pairs: tuple[str, object]) -> CommentedMap:
        return CommentedMap(pairs)

    def probe(path: str, period: int, failures: int) -> CommentedMap:
        return m(
            ("httpGet", m(("path", path), ("port", ADMIN_PORT_NAME))),
            ("periodSeconds", period),
            ("failureThreshold", failures),
        )

    env = [
        m(("name", "PROXYMQ_SERVICE"), ("value", injection.service)),
        m(("name", "PROXYMQ_TARGET"), ("value", f"http://127.0.0.1:{port}")),
        m(("name", "PROXYMQ_PARTITIONS"), ("value", str(injection.partitions))),
        m(("name", "PROXYMQ_ADMIN_PORT"), ("value", str(ADMIN_PORT))),
        m(("name", "PROXYMQ_AMQP_URL_FILE"), ("value", f"{SECRET_DIR}/{AMQP_SECRET_KEY}")),
        m(
            ("name", "PROXYMQ_INSTANCE_ID"),
            ("valueFrom", m(("fieldRef", m(("fieldPath", "metadata.name"))))),
        ),
    ]
    if injection.ready_path is not None:
        env.append(m(("name", "PROXYMQ_READY_PATH"), ("value", injection.ready_path)))
    return m(
        ("name", CONTAINER),
        ("image", injection.image),
        ("restartPolicy", "Always"),
        ("env", CommentedSeq(env)),
        ("ports", CommentedSeq([m(("name", ADMIN_PORT_NAME), ("containerPort", ADMIN_PORT))])),
        ("startupProbe", probe("/healthz", 1, 30)),
        ("livenessProbe", probe("/healthz", 10, 3)),
        ("readinessProbe", probe("/readyz", 5, 2)),
        (
            "volumeMounts",
            CommentedSeq([m(("name", AMQP_VOLUME), ("mountPath", SECRET_DIR), ("readOnly", True))]),
        ),
        (
            "resources",
            m(
                ("requests", m(("cpu", "50m"), ("memory", "64Mi"))),
                ("limits", m(("memory", "256Mi"))),
            ),
        ),
        (
            "securityContext",
            m(
                ("runAsNonRoot", True),
                ("runAsUser", SIDECAR_UID),
                ("runAsGroup", SIDECAR_UID),
                ("allowPrivilegeEscalation", False),
                ("readOnlyRootFilesystem", True),
                ("capabilities", m(("drop", CommentedSeq(["ALL"])))),
            ),
        ),
    )


# Lists merged entry by entry (by name), so entries a user added survive a re-injection.
MERGED_BY_NAME = ("env", "ports", "volumeMounts")
# Fields a user may tune; set only when missing.
KEPT_WHEN_SET = ("resources", "securityContext")


def add_sidecar(pod: CommentedMap, desired: CommentedMap, name: str) -> CommentedMap:
    """Append the sidecar after any existing init containers (migrations and the like finish
    first; a mesh proxy injected earlier starts before it and stops after it), or update the
    one already there. A `proxymq-dequeuer` in `containers` (an older, non-native injection)
    is moved; a pod with no other container has nothing for it to call and is refused. Returns
    the sidecar as it now is."""
    from ruamel.yaml.comments import CommentedSeq

    containers = pod["containers"]
    if all(c.get("name") == CONTAINER for c in containers):
        raise InjectError(
            f"{name}: it has no container but {CONTAINER}, so no microservice for the dequeuer "
            "to call: inject the workload of the microservice itself"
        )
    init = pod.get("initContainers")
    if init is None:  # pod_spec checked it is a list of mappings when present
        init = pod["initContainers"] = CommentedSeq()
    old = [i for i, c in enumerate(containers) if c.get("name") == CONTAINER]
    if old and len(containers) > len(old):
        init.append(containers.pop(old[0]))
    for container in init:
        if container.get("name") == CONTAINER:
            update(container, desired)
            return container  # type: ignore[no-any-return]
    init.append(desired)
    return desired


def update(existing: CommentedMap, desired: CommentedMap) -> None:
    """Make `existing` say what `desired` says, touching only what differs (so comments on
    unchanged lines stay)."""
    for key, value in desired.items():
        if key in MERGED_BY_NAME and isinstance(existing.get(key), list):
            merge_by_name(existing[key], value)
        elif key in KEPT_WHEN_SET and key in existing:
            continue
        elif existing.get(key) != value:
            existing[key] = value


def merge_by_name(existing: CommentedSeq, desired: CommentedSeq) -> None:
    for entry in desired:
        for index, old in enumerate(existing):
            if isinstance(old, dict) and old.get("name") == entry["name"]:
                if old != entry:
                    existing[index] = entry
                break
        else:
            existing.append(entry)


def ensure_volume(pod: CommentedMap, secret: str, at: At) -> None:
    """The AMQP URL, password included, is readable by the pod's fsGroup only (0440, as in
    deploy/k8s; Kubernetes' default 0644 lets every process of the pod read it). Every
    container's process is in the fsGroup: the pod's own is kept, else the sidecar's uid."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    context = mapping(pod, "securityContext", at)
    if context is None:
        context = pod["securityContext"] = CommentedMap()
    if context.get("fsGroup") is None:
        context["fsGroup"] = SIDECAR_UID
    source = CommentedMap([("secretName", secret), ("defaultMode", SECRET_MODE)])
    source.yaml_add_eol_comment(f"{SECRET_MODE:#o}".replace("0o", "0"), "defaultMode")
    volumes = pod.get("volumes")
    if volumes is None:  # pod_spec checked it is a list of mappings when present
        volumes = pod["volumes"] = CommentedSeq()
    for volume in volumes:
        if volume.get("name") == AMQP_VOLUME:
            if volume.get("secret") != source:
                volume["secret"] = source
            return
    volumes.append(CommentedMap([("name", AMQP_VOLUME), ("secret", source)]))


def guess_indent(text: str) -> tuple[int, int]:
    """(mapping indent, offset of a list's dash under its key) as the input writes them, so the
    output keeps the input's style: kubectl writes `containers:` / `- name:` (offset 0), most
    hand-written manifests indent the dash by 2."""
    mapping: int | None = None
    offset: int | None = None
    lines = [
        line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    for previous, line in itertools.pairwise(lines):
        if not previous.rstrip().endswith(":"):
            continue
        parent = len(previous) - len(previous.lstrip())
        if (item := _SEQUENCE_ITEM.match(previous)) is not None:
            parent = len(item.group(1)) + 2  # the key after "- "
        child = len(line) - len(line.lstrip())
        if line.lstrip().startswith("- "):
            offset = child - parent if offset is None and child >= parent else offset
        elif mapping is None and child > parent:
            mapping = child - parent
        if mapping is not None and offset is not None:
            break
    return mapping or 2, offset if offset is not None else 2


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "inject",
        help="add the dequeuer sidecar to Kubernetes workloads (YAML on stdin)",
        description=(
            "Read Kubernetes YAML on stdin (one or more documents) and write it to stdout with a "
            f"{CONTAINER} native sidecar (an init container with restartPolicy: Always) in the "
            "pod template of every Deployment, StatefulSet, DaemonSet and ReplicaSet. Other "
            "kinds pass through; comments and unknown fields are kept; running it twice gives "
            "the same output."
        ),
        epilog=(
            f"The AMQP URL is read from key '{AMQP_SECRET_KEY}' of Secret --amqp-secret, "
            f"mounted at {SECRET_DIR}. Example: kubectl get deploy url-fetcher -o yaml | "
            "proxymq inject --service url-fetcher --target-port 8000 | kubectl apply -f -"
        ),
    )
    add_setting(
        parser,
        "--service",
        metavar="NAME",
        required=True,
        help="the service the dequeuer consumes for",
    )
    parser.add_argument(
        "--target-port",
        metavar="PORT",
        type=int,
        help="port of the microservice on localhost (default: the first containerPort, "
        f"else {DEFAULT_TARGET_PORT})",
    )
    parser.add_argument(
        "--image",
        metavar="IMAGE",
        default=DEFAULT_IMAGE,
        help=f"dequeuer image (default: {DEFAULT_IMAGE})",
    )
    add_setting(
        parser,
        "--partitions",
        int,
        metavar="N",
        default=8,
        help="partition queues; every dequeuer of the service must agree (default: 8)",
    )
    parser.add_argument(
        "--amqp-secret",
        metavar="SECRET",
        default=AMQP_SECRET,
        help=f"Secret with the AMQP URL under key '{AMQP_SECRET_KEY}' (default: {AMQP_SECRET})",
    )
    parser.add_argument(
        "--ready-path",
        metavar="PATH",
        help="the microservice's readiness path, set as the injected dequeuer's "
        "PROXYMQ_READY_PATH: it consumes nothing until the path answers 2xx",
    )
    parser.add_argument(
        "--drain-hook",
        action="store_true",
        help="give the microservice's container the preStop hook that drains the dequeuer "
        f"first (python {DRAIN_SCRIPT}); its image needs Python and that file, as proxymq's "
        "images have",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        injection = Injection(
            service=args.service,
            target_port=args.target_port,
            image=args.image,
            partitions=args.partitions,
            amqp_secret=args.amqp_secret,
            ready_path=args.ready_path,
            drain_hook=args.drain_hook,
        )
    except ValueError as exc:
        print(f"proxymq inject: {exc}", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        print(
            "proxymq inject: reads YAML on stdin, e.g. "
            "kubectl get deploy NAME -o yaml | proxymq inject --service S",
            file=sys.stderr,
        )
        return 2
    try:
        output, report = inject_text(sys.stdin.read(), injection)
    except InjectError as exc:
        print(f"proxymq inject: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:  # ruamel.yaml is a dependency; a stale venv may lack it
        print(f"proxymq inject: {exc}: pip install ruamel.yaml", file=sys.stderr)
        return 1
    sys.stdout.write(output)
    for note in report.notes:
        print(f"proxymq inject: note: {note}", file=sys.stderr)
    injected = ", ".join(report.injected) or "no workload found"
    print(f"proxymq inject: {CONTAINER} for {injection.service}: {injected}", file=sys.stderr)
    return 0
