"""`proxymq keda`, run as a user runs it: the console script, output on stdout."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import topology
from shared.cli import keda
from tests.deploy.support import K8S

PROXYMQ = str(Path(sys.executable).with_name("proxymq"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROXYMQ, "keda", *args], capture_output=True, text=True, timeout=60, check=False
    )


def parse(text: str) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(text)}


# What the API server accepts, written out here rather than taken from the code under test.
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def check_kubernetes_names(objects: dict[str, dict[str, Any]]) -> None:
    """Object names are DNS-1123 subdomains (253 characters at most), label values and the
    ScaledObject's name (KEDA labels its HPA with it) 63 at most."""
    scaled, auth = objects["ScaledObject"], objects["TriggerAuthentication"]
    short = [
        scaled["metadata"]["name"],
        scaled["spec"]["scaleTargetRef"]["name"],
        *(v for o in (scaled, auth) for v in o["metadata"]["labels"].values()),
    ]
    names = [
        *short,
        auth["metadata"]["name"],
        scaled["spec"]["triggers"][0]["authenticationRef"]["name"],
        auth["spec"]["secretTargetRef"][0]["name"],
    ]
    assert all(len(name) <= 63 for name in short), short
    assert all(DNS_LABEL.fullmatch(name) and len(name) <= 253 for name in names), names


def test_prints_the_checked_in_manifest() -> None:
    result = run("--service", "url-fetcher")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (K8S / "url-fetcher-keda.yaml").read_text()


def test_options_reach_the_scaled_object() -> None:
    result = run(
        "--service", "billing", "--partitions", "16", "--min", "1", "--max", "12",
        "--queue-length", "50", "--activation", "5", "--cooldown", "120", "--kind", "StatefulSet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    objects = parse(result.stdout)
    spec = objects["ScaledObject"]["spec"]
    meta = spec["triggers"][0]["metadata"]
    assert meta["queueName"] == topology.partition_pattern("billing") == r"(?-i:^billing\.p\d+$)"
    assert (meta["value"], meta["activationValue"]) == ("50", "5")
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["cooldownPeriod"]) == (
        1,
        12,
        120,
    )
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "billing",
    }
    assert objects["TriggerAuthentication"]["metadata"]["name"] == "billing-rabbitmq"
    assert "--max 12" in result.stdout.splitlines()[1], "the header names how to regenerate it"


def test_more_pods_than_partitions_is_allowed_with_a_note() -> None:
    result = run("--service", "small", "--partitions", "2", "--max", "4")
    assert result.returncode == 0
    assert "standbys" in result.stderr
    assert parse(result.stdout)["ScaledObject"]["spec"]["maxReplicaCount"] == 4


def test_default_max_is_capped_by_the_partition_count() -> None:
    result = run("--service", "small", "--partitions", "3")
    assert parse(result.stdout)["ScaledObject"]["spec"]["maxReplicaCount"] == 3


def test_refuses_what_keda_could_not_count() -> None:
    too_many = run("--service", "huge", "--partitions", "501")
    assert too_many.returncode == 2
    assert "500" in too_many.stderr
    assert not too_many.stdout
    dotted = run("--service", "a.b")
    assert dotted.returncode == 2
    assert "service name" in dotted.stderr
    inverted = run("--service", "x", "--min", "5", "--max", "2")
    assert inverted.returncode == 2
    assert "min" in inverted.stderr


def test_the_header_regenerates_the_output() -> None:
    result = run(
        "--service", "billing", "--max", "3", "--name", "billing.v2", "--kind", "StatefulSet"
    )
    assert result.returncode == 0, result.stderr
    command = result.stdout.splitlines()[1].split("`")[1]
    words = shlex.split(command)
    assert words[:2] == ["proxymq", "keda"]
    assert run(*words[2:]).stdout == result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("--name", "a\nkind: Evil"),
        ("--name", "Billing"),
        ("--name", "billing_v2"),
        ("--name", "billing-"),
        ("--name", "b" * 64),
        ("--name", ""),
        ("--management-secret", "s\nkind: Evil"),
        ("--management-secret", ""),
        ("--management-secret", "My_Secret"),
    ],
)
def test_a_name_kubernetes_would_refuse_is_a_usage_error(args: tuple[str, str]) -> None:
    result = run("--service", "billing", *args)
    assert result.returncode == 2
    assert not result.stdout
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"proxymq keda: {args[0]} ") and "not a Kubernetes name" in line


@pytest.mark.parametrize("service", ["My_Svc", "my_svc", "svc-", "svc_", "S" * 100, "a" * 99 + "-"])
def test_a_service_name_that_is_no_kubernetes_name_is_mapped_to_one(service: str) -> None:
    result = run("--service", service)
    assert result.returncode == 0, result.stderr
    objects = parse(result.stdout)
    check_kubernetes_names(objects)
    scaled = objects["ScaledObject"]
    assert scaled["spec"]["triggers"][0]["metadata"]["queueName"] == (
        topology.partition_pattern(service)
    ), "the queues keep the real service name"
    assert scaled["metadata"]["name"] in result.stderr, "a note says which name is used"
    assert run("--service", service, "--name", "web").stdout.count("name: web\n") == 2


def test_mapped_names_never_collide() -> None:
    services = ("my-svc", "My_Svc", "my_svc", "MY-SVC", "my-svc-", "x" * 100, "x" * 99)
    assert len({keda.Scaling(service).target for service in services}) == len(services)
    plain = run("--service", "my-svc")
    assert parse(plain.stdout)["ScaledObject"]["metadata"]["name"] == "my-svc"
    assert not plain.stderr


@pytest.mark.parametrize("partitions", ["0", "-3"])
def test_no_partitions_is_refused_as_such(partitions: str) -> None:
    result = run("--service", "x", "--partitions", partitions)
    assert result.returncode == 2
    assert result.stderr == f"proxymq keda: --partitions must be at least 1, not {partitions}\n"


def test_a_scale_down_window_the_hpa_refuses_is_a_usage_error() -> None:
    assert run("--service", "x", "--scale-down-window", "3600").returncode == 0
    longer = run("--service", "x", "--scale-down-window", "3601")
    assert longer.returncode == 2
    assert "3600" in longer.stderr


@pytest.mark.parametrize("flag", ["--min", "--max", "--cooldown", "--polling-interval"])
def test_a_count_over_32_bits_is_a_usage_error(flag: str) -> None:
    """Kubernetes refuses the whole ScaledObject when one of these is over 2**31 - 1."""
    limit = str(2**31 - 1)
    args = ["--min", "0"] if flag == "--max" else ["--max", limit]
    assert run("--service", "x", *args, flag, limit).returncode == 0
    refused = run("--service", "x", *args, flag, str(2**31))
    assert refused.returncode == 2
    assert refused.stderr == (
        f"proxymq keda: {flag} {2**31}: the ScaledObject holds at most {limit} (a 32-bit "
        "integer); Kubernetes would refuse it\n"
    )
