"""`proxymq keda --service S`: the KEDA objects that scale a service's pods on its queue depth.

Prints a `TriggerAuthentication` (the management API URL, credentials included, read from a
Secret) and a `ScaledObject` whose single `rabbitmq` trigger sums the depth of every queue
matching `shared.topology.partition_pattern(S)`: `(?-i:^S\\.p\\d+$)`, anchored and
case-sensitive (the management API matches without regard to case otherwise), so neither
`S.dlq` nor another service's queues count. `deploy/k8s/url-fetcher-keda.yaml` is this
command's output for url-fetcher, and a test keeps the two equal.

Three choices keep pods from being scaled away while they hold work:

- `excludeUnacknowledged: "false"`: a request a dequeuer has taken but not finished is unacked;
  counting it keeps the metric above zero (and the pods alive) until the work is done.
- `pageSize: "500"`: with `useRegex`, KEDA asks the management API for page 1 only
  (`/api/queues/VHOST?page=1&page_size=N&use_regex=true&name=REGEX`). RabbitMQ filters by name
  first, then pages (100 by default, 500 at most, a larger page is a 400). Partitions beyond the
  first page would be missed (older KEDA summed page 1 silently; newer ones fail the trigger),
  so the page is RabbitMQ's largest and more than 500 partitions are refused here.
- A scale-down stabilization window and a one-pod-a-minute policy: a short lull does not take
  pods away, and each removed pod gets its full termination grace to drain (docs/deploy.md).

Every name and label it writes is one Kubernetes accepts: `--name` and `--management-secret` are
checked, and a service name that is no DNS-1123 label (`My_Svc`, 100 characters) is mapped to
one by `kubernetes_name`; the queue regex and the comments keep the real service name.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import shlex
import sys
from dataclasses import dataclass, fields
from typing import Literal, TypeAlias

from shared import topology
from shared.cli.common import add_setting

Json: TypeAlias = str | int | bool | list["Json"] | dict[str, "Json"] | None
KeyPath: TypeAlias = tuple[str | int, ...]

PAGE_SIZE = 500  # RabbitMQ management's MAX_PAGE_SIZE: page_size=501 is answered 400
DEFAULT_MAX = 10
MANAGEMENT_SECRET = "proxymq-rabbitmq-management"
MANAGEMENT_SECRET_KEY = "host"
MAX_STABILIZATION_WINDOW = 3600  # the HPA refuses a longer scale-down window
INT32_MAX = 2**31 - 1  # the ScaledObject's counts and periods are 32-bit integers
# Object names and label values; KEDA also labels its HPA with the ScaledObject's name.
NAME_LIMIT = 63
SECRET_NAME_LIMIT = 253
_DNS_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_LABEL = re.compile(_DNS_LABEL)
DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")


def check_kubernetes_name(value: str, option: str, limit: int) -> str:
    """A DNS-1123 subdomain of at most `limit` characters; anything else would be refused by
    the API server, or (a newline) break the YAML this command prints."""
    if len(value) <= limit and DNS_SUBDOMAIN.fullmatch(value):
        return value
    raise ValueError(
        f"{option} {value!r} is not a Kubernetes name: lowercase letters, digits, '-' and '.', "
        f"starting and ending with a letter or digit, at most {limit} characters"
    )


def kubernetes_name(service: str) -> str:
    """The service's name where Kubernetes needs one (object names, label values): the name
    itself when it is a DNS-1123 label, else lowercased with '_' as '-', trimmed, and suffixed
    with a hash of the real name, so that `My_Svc` and `my-svc` never share objects."""
    if len(service) <= NAME_LIMIT and DNS_LABEL.fullmatch(service):
        return service
    digest = hashlib.sha256(service.encode()).hexdigest()[:8]
    base = service.lower().replace("_", "-")[: NAME_LIMIT - len(digest) - 1].rstrip("-")
    return f"{base}-{digest}"  # a service name starts with a letter or digit: base is not empty


@dataclass(frozen=True)
class Scaling:
    """What the ScaledObject says; `max_replicas` None means min(10, partitions): with single
    active consumer per partition, a pod beyond the partition count only waits as a standby."""

    service: str
    partitions: int = 8
    min_replicas: int = 0
    max_replicas: int | None = None
    queue_length: int = 20
    activation: int = 0
    cooldown: int = 300
    scale_down_window: int = 300
    polling_interval: int = 15
    target_kind: Literal["Deployment", "StatefulSet"] = "Deployment"
    target_name: str | None = None
    management_secret: str = MANAGEMENT_SECRET

    def __post_init__(self) -> None:
        topology.check_service_name(self.service)
        if self.target_name is not None:
            check_kubernetes_name(self.target_name, "--name", NAME_LIMIT)
        check_kubernetes_name(self.management_secret, "--management-secret", SECRET_NAME_LIMIT)
        if self.partitions < 1:
            raise ValueError(f"--partitions must be at least 1, not {self.partitions}")
        if self.partitions > PAGE_SIZE:
            raise ValueError(
                f"--partitions {self.partitions}: KEDA reads one page of the management API's "
                f"queue list, at most {PAGE_SIZE} queues, so at most {PAGE_SIZE} partitions"
            )
        too_large = [
            f"{flag} {value}"
            for flag, value in (
                ("--min", self.min_replicas),
                ("--max", self.max),
                ("--cooldown", self.cooldown),
                ("--polling-interval", self.polling_interval),
            )
            if value > INT32_MAX
        ]
        if too_large:
            raise ValueError(
                f"{', '.join(too_large)}: the ScaledObject holds at most {INT32_MAX} "
                "(a 32-bit integer); Kubernetes would refuse it"
            )
        if self.min_replicas < 0 or self.max < max(1, self.min_replicas):
            raise ValueError(
                f"--min {self.min_replicas} --max {self.max}: need 0 <= min <= max and max >= 1"
            )
        if self.queue_length < 1 or self.activation < 0:
            raise ValueError("--queue-length must be at least 1 and --activation at least 0")
        if min(self.cooldown, self.scale_down_window, self.polling_interval) < 1:
            raise ValueError("--cooldown, --scale-down-window and --polling-interval must be >= 1")
        if self.scale_down_window > MAX_STABILIZATION_WINDOW:
            raise ValueError(
                f"--scale-down-window must be at most {MAX_STABILIZATION_WINDOW} seconds "
                "(the HPA's limit)"
            )

    @property
    def max(self) -> int:
        if self.max_replicas is not None:
            return self.max_replicas
        return min(DEFAULT_MAX, self.partitions)

    @property
    def name(self) -> str:
        """The service's name in Kubernetes; RabbitMQ names keep `service` itself."""
        return kubernetes_name(self.service)

    @property
    def target(self) -> str:
        return self.target_name or self.name

    @property
    def auth_name(self) -> str:
        return f"{self.name}-rabbitmq"


OPTIONS = {
    "partitions": "--partitions",
    "min_replicas": "--min",
    "max_replicas": "--max",
    "queue_length": "--queue-length",
    "activation": "--activation",
    "cooldown": "--cooldown",
    "scale_down_window": "--scale-down-window",
    "polling_interval": "--polling-interval",
    "target_kind": "--kind",
    "target_name": "--name",
    "management_secret": "--management-secret",
}


def command_line(spec: Scaling) -> str:
    """The command that prints `spec`: service and partitions always, other options when they
    differ from their defaults, so a manifest names how to regenerate it."""
    words = ["proxymq", "keda", "--service", spec.service, "--partitions", str(spec.partitions)]
    for field in fields(spec):
        value = getattr(spec, field.name)
        if field.name in OPTIONS and field.name != "partitions" and value != field.default:
            words += [OPTIONS[field.name], str(value)]
    return shlex.join(words)


def labels(service: str) -> dict[str, Json]:
    return {"app.kubernetes.io/name": service, "app.kubernetes.io/part-of": "proxymq"}


def trigger_authentication(spec: Scaling) -> dict[str, Json]:
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": {"name": spec.auth_name, "labels": labels(spec.name)},
        "spec": {
            "secretTargetRef": [
                {"parameter": "host", "name": spec.management_secret, "key": MANAGEMENT_SECRET_KEY}
            ]
        },
    }


def trigger_metadata(spec: Scaling) -> dict[str, Json]:
    """KEDA takes every trigger value as a string; numbers here would fail its CRD schema."""
    return {
        "protocol": "http",
        "mode": "QueueLength",
        "value": str(spec.queue_length),
        "activationValue": str(spec.activation),
        "queueName": topology.partition_pattern(spec.service),
        "useRegex": "true",
        "operation": "sum",
        "pageSize": str(PAGE_SIZE),
        "excludeUnacknowledged": "false",
    }


def scaled_object(spec: Scaling) -> dict[str, Json]:
    scale_down: dict[str, Json] = {
        "stabilizationWindowSeconds": spec.scale_down_window,
        "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
    }
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": spec.target, "labels": labels(spec.name)},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": spec.target_kind,
                "name": spec.target,
            },
            "pollingInterval": spec.polling_interval,
            "cooldownPeriod": spec.cooldown,
            "minReplicaCount": spec.min_replicas,
            "maxReplicaCount": spec.max,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": scale_down}}},
            "triggers": [
                {
                    "type": "rabbitmq",
                    "metadata": trigger_metadata(spec),
                    "authenticationRef": {"name": spec.auth_name},
                }
            ],
        },
    }


def manifests(spec: Scaling) -> list[dict[str, Json]]:
    """The TriggerAuthentication first: the ScaledObject names it."""
    return [trigger_authentication(spec), scaled_object(spec)]


def comments(spec: Scaling) -> list[dict[KeyPath, str]]:
    """End-of-line comments per document, keyed by the path of the commented key."""
    trigger: KeyPath = ("spec", "triggers", 0, "metadata")
    scaled: dict[KeyPath, str] = {
        ("spec", "cooldownPeriod"): "seconds with nothing waiting before scaling to zero",
        (*trigger, "protocol"): "regex and unacked counts need the management API",
        (*trigger, "value"): "messages per pod (ready + unacked, summed over the partitions)",
        (*trigger, "activationValue"): "scale from zero once more than this many wait",
        (*trigger, "queueName"): (
            f"anchored, case-sensitive: {spec.service}.p0..p{spec.partitions - 1} only, never "
            f"{spec.service}.dlq"
        ),
        (*trigger, "pageSize"): "KEDA reads page 1 only: RabbitMQ's largest page, all partitions",
        (*trigger, "excludeUnacknowledged"): "work in progress keeps its pods",
    }
    if spec.max > spec.partitions:
        scaled[("spec", "maxReplicaCount")] = (
            f"beyond {spec.partitions} partitions, extra pods only wait as standbys"
        )
    auth: dict[KeyPath, str] = {
        ("spec", "secretTargetRef", 0, "key"): (
            "http://USER:PASSWORD@RABBITMQ:15672/ (management API, the password "
            "percent-encoded; the final / is vhost /)"
        )
    }
    return [auth, scaled]


def render(spec: Scaling) -> str:
    """YAML with comments; ruamel.yaml is imported here so that a missing install breaks only
    this command, not every `proxymq` subcommand."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    def commented(value: Json) -> object:
        if isinstance(value, dict):
            return CommentedMap((k, commented(v)) for k, v in value.items())
        if isinstance(value, list):
            return CommentedSeq(commented(v) for v in value)
        return value

    documents = []
    for manifest, notes in zip(manifests(spec), comments(spec), strict=True):
        document = commented(manifest)
        for path, text in notes.items():
            parent = document
            for step in path[:-1]:
                parent = parent[step]  # type: ignore[index]
            parent.yaml_add_eol_comment(text, path[-1])  # type: ignore[attr-defined]
        documents.append(document)
    yaml = YAML()
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    yaml.explicit_start = True
    out = io.StringIO()
    yaml.dump_all(documents, out)
    header = (
        f"# KEDA autoscaling of {spec.service} on the summed depth of its partition queues.\n"
        f"# Generated by `{command_line(spec)}`; why each field: docs/deploy.md#keda\n"
    )
    return header + out.getvalue()


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "keda",
        help="print the KEDA ScaledObject and TriggerAuthentication for a service",
        description=(
            "Print a KEDA ScaledObject (trigger rabbitmq over the management API, the summed "
            "depth of the queues matching (?-i:^SERVICE\\.p\\d+$), unacked messages included) "
            "and its TriggerAuthentication. Apply with: "
            "proxymq keda --service S | kubectl apply -f -"
        ),
        epilog=(
            f"The TriggerAuthentication reads key '{MANAGEMENT_SECRET_KEY}' of Secret "
            f"--management-secret: the management URL with credentials, e.g. "
            "http://user:password@rabbitmq:15672/ , the password percent-encoded (p%40ss for "
            "p@ss). See docs/deploy.md."
        ),
    )
    add_setting(
        parser, "--service", metavar="NAME", required=True, help="the service whose pods are scaled"
    )
    add_setting(
        parser,
        "--partitions",
        int,
        metavar="N",
        default=8,
        help=f"partition queues of the service, at most {PAGE_SIZE} (default: 8)",
    )
    parser.add_argument(
        "--min",
        metavar="N",
        type=int,
        default=0,
        dest="min_replicas",
        help="fewest pods; 0 scales to zero (default: 0)",
    )
    parser.add_argument(
        "--max",
        metavar="N",
        type=int,
        default=None,
        dest="max_replicas",
        help="most pods (default: 10, or the partition count if smaller)",
    )
    parser.add_argument(
        "--queue-length",
        metavar="N",
        type=int,
        default=20,
        help="target waiting + in-progress messages per pod (default: 20)",
    )
    parser.add_argument(
        "--activation",
        metavar="N",
        type=int,
        default=0,
        help=(
            "messages above which a service at zero pods is woken: up to that many requests "
            "may wait there for good, and 0 wakes it for any message (default: 0)"
        ),
    )
    parser.add_argument(
        "--cooldown",
        metavar="SECONDS",
        type=int,
        default=300,
        help="seconds idle before scaling to zero (default: 300)",
    )
    parser.add_argument(
        "--scale-down-window",
        metavar="SECONDS",
        type=int,
        default=300,
        help="HPA scale-down stabilization window in seconds, at most "
        f"{MAX_STABILIZATION_WINDOW} (default: 300)",
    )
    parser.add_argument(
        "--polling-interval",
        metavar="SECONDS",
        type=int,
        default=15,
        help="seconds between queue checks (default: 15)",
    )
    parser.add_argument(
        "--kind",
        choices=["Deployment", "StatefulSet"],
        default="Deployment",
        help="kind of the scaled workload (default: Deployment)",
    )
    parser.add_argument(
        "--name",
        metavar="NAME",
        help="name of the scaled workload (default: the service name, made a Kubernetes name "
        "when it is none)",
    )
    parser.add_argument(
        "--management-secret",
        metavar="SECRET",
        default=MANAGEMENT_SECRET,
        help=f"Secret holding the management URL (default: {MANAGEMENT_SECRET})",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        spec = Scaling(
            service=args.service,
            partitions=args.partitions,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            queue_length=args.queue_length,
            activation=args.activation,
            cooldown=args.cooldown,
            scale_down_window=args.scale_down_window,
            polling_interval=args.polling_interval,
            target_kind=args.kind,
            target_name=args.name,
            management_secret=args.management_secret,
        )
    except ValueError as exc:
        print(f"proxymq keda: {exc}", file=sys.stderr)
        return 2
    if spec.target_name is None and spec.name != spec.service:
        print(
            f"proxymq keda: note: {spec.service!r} is no Kubernetes name: the objects are named "
            f"after {spec.name} and scale {spec.target_kind} {spec.name}; pass --name if yours "
            "is named otherwise",
            file=sys.stderr,
        )
    if spec.max > spec.partitions:
        print(
            f"proxymq keda: note: --max {spec.max} exceeds {spec.partitions} partitions; each "
            "partition has one active consumer, so the extra pods only wait as standbys",
            file=sys.stderr,
        )
    try:
        text = render(spec)
    except ModuleNotFoundError as exc:  # ruamel.yaml is a dependency; a stale venv may lack it
        print(f"proxymq keda: {exc}: pip install ruamel.yaml", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0
