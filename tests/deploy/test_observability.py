"""Dashboard and alerts: every metric they name is exported (ours by the sidecars' registries,
RabbitMQ's by rabbitmq_prometheus), and promtool accepts the rules, their unit tests, the
Prometheus config and every dashboard query."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from shared.metrics import DequeuerMetrics, EnqueuerMetrics
from tests.deploy.support import ROOT, promql_names

PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "proxymq.json"
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}
# Served by rabbitmq_prometheus 3.10.8 with prometheus.return_per_object_metrics = true, every
# one labelled {vhost, queue} (read off a running node's /metrics).
RABBITMQ_QUEUE_METRICS = {
    "rabbitmq_queue_messages",
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_consumers",
    "rabbitmq_queue_consumer_utilisation",
    "rabbitmq_queue_messages_published_total",
    "rabbitmq_queue_messages_bytes",
    "rabbitmq_queue_head_message_timestamp",
}


def exported(registry: CollectorRegistry) -> set[str]:
    """Sample names a registry exports; labelled metrics have no sample before first use, so
    the names are derived from each family's type as the exposition format writes them."""
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def exported_names() -> set[str]:
    return exported(EnqueuerMetrics().registry) | exported(DequeuerMetrics().registry)


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def dashboard_queries() -> list[str]:
    queries = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    queries += [v["definition"] for v in dashboard()["templating"]["list"]]
    return queries


def rule_expressions() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is needed to check the Prometheus rules: apt-get install prometheus "
            "(Debian ships promtool in it)"
        )
    return found


def test_exported_names_follow_the_exposition_format() -> None:
    names = exported_names()
    assert "proxymq_enqueuer_requests_total" in names
    assert "proxymq_enqueuer_request_duration_seconds_bucket" in names
    assert "proxymq_dequeuer_in_flight_requests" in names
    assert "proxymq_enqueuer_requests" not in names


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_proxymq_metric_referenced_is_exported(source: str) -> None:
    expressions = dashboard_queries() if source == "dashboard" else rule_expressions()
    referenced = set().union(*(promql_names(e, "proxymq") for e in expressions))
    assert referenced, f"the {source} names no proxymq metric"
    missing = referenced - exported_names()
    assert not missing, f"the {source} uses metrics no sidecar exports: {sorted(missing)}"


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_rabbitmq_metric_referenced_is_served_per_object(source: str) -> None:
    expressions = dashboard_queries() if source == "dashboard" else rule_expressions()
    referenced = set().union(*(promql_names(e, "rabbitmq") for e in expressions))
    assert referenced
    assert referenced <= RABBITMQ_QUEUE_METRICS, referenced - RABBITMQ_QUEUE_METRICS


def test_the_dashboard_covers_what_operators_ask_about() -> None:
    text = " ".join(dashboard_queries())
    for metric in (
        "proxymq_enqueuer_requests_total",
        "proxymq_enqueuer_request_duration_seconds_bucket",
        "proxymq_enqueuer_in_flight_requests",
        "rabbitmq_queue_messages",
        "proxymq_broker_reconnects_total",
        "proxymq_dequeuer_messages_total",
    ):
        assert metric in text, metric
    assert "histogram_quantile" in text
    assert "dlq" in text


def test_dashboard_is_well_formed_and_provisioned() -> None:
    data = dashboard()
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    datasources = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/datasources.yml").read_text()
    )
    uids = {d["uid"] for d in datasources["datasources"]}
    for panel in data["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] in uids, panel["title"]
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/dashboards.yml").read_text()
    )
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    path = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in mounts


def test_promtool_accepts_the_rules_and_their_unit_tests() -> None:
    tool = promtool()
    for args in (
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
        ["check", "config", "prometheus.yml"],
    ):
        result = subprocess.run(
            [tool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Grafana's variables replaced by what they expand to, each query becomes a recording rule
    that promtool must parse."""
    tool = promtool()
    rules = []
    for index, query in enumerate(
        q for q in dashboard_queries() if not q.startswith("label_values")
    ):
        expr = query.replace("$__rate_interval", "1m").replace("$service", "url-fetcher")
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def anchors(markdown: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in markdown.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^a-z0-9 -]", "", title).replace(" ", "-"))
    return found


def test_every_docs_link_of_the_deploy_files_has_its_section() -> None:
    """Runbook links in the alerts, `docs/...#anchor` in manifests and CLI help: each names a
    heading that exists, so an operator following one lands somewhere."""
    sources = [
        PROMETHEUS / "alerts.yml",
        *sorted((ROOT / "deploy" / "k8s").glob("*.yaml")),
        ROOT / "shared" / "cli" / "keda.py",
        ROOT / "shared" / "cli" / "inject.py",
        ROOT / "docs" / "deploy.md",
        ROOT / "docs" / "operations.md",
    ]
    links = set()
    for source in sources:
        links |= set(
            re.findall(r"(docs/[a-z-]+\.md|\(([a-z-]+\.md))#([a-z0-9-]+)", source.read_text())
        )
    assert links
    for path, relative, anchor in links:
        markdown = ROOT / "docs" / relative if relative else ROOT / path
        assert anchor in anchors(markdown), f"{markdown.name} has no section #{anchor}"
    runbooks = re.findall(
        r"runbook: (docs/operations\.md#[a-z-]+)", (PROMETHEUS / "alerts.yml").read_text()
    )
    assert len(runbooks) >= 8


def test_every_exported_metric_is_documented() -> None:
    documented = (ROOT / "docs" / "operations.md").read_text()
    for metrics in (EnqueuerMetrics(), DequeuerMetrics()):
        for family in metrics.registry.collect():
            name = family.name + ("_total" if family.type == "counter" else "")
            assert f"`{name}`" in documented, f"{name} is not in docs/operations.md, Metrics"
