"""`proxymq keda`, run as a user runs it: the console script, output on stdout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from shared import topology
from tests.deploy.support import K8S

PROXYMQ = str(Path(sys.executable).with_name("proxymq"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROXYMQ, "keda", *args], capture_output=True, text=True, timeout=60, check=False
    )


def parse(text: str) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(text)}


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
    assert meta["queueName"] == topology.partition_pattern("billing") == r"^billing\.p\d+$"
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
