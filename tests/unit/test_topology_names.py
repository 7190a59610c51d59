"""Queue names and specs: one anchored pattern finds a service's partitions and nothing else."""

from __future__ import annotations

import re
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue

from shared.topology import (
    Topology,
    check_service_name,
    dead_letter_queue,
    declare_partition,
    exchange_name,
    members_queue,
    partition_pattern,
    partition_queue,
)


def test_names() -> None:
    assert exchange_name("orders") == "orders"
    assert partition_queue("orders", 0) == "orders.p0"
    assert partition_queue("orders", 17) == "orders.p17"
    assert dead_letter_queue("orders") == "orders.dlq"


def test_heartbeat_queues_fit_and_stay_apart() -> None:
    """Named after the dequeuer's id, readable when it fits AMQP's 255 bytes; a pod name (up
    to 253) of a service with a long name does not, and two that differ only past what fits
    must still name two queues."""
    assert members_queue("orders", "orders-7d9f-x2k4q") == "orders.members.orders-7d9f-x2k4q"
    service, pod = "s" * 100, "a" * 252
    names = {members_queue(service, pod + end) for end in "bc"}
    assert len(names) == 2
    for name in names:
        assert len(name.encode()) <= 255 and name.startswith(f"{service}.members.")


def test_topology_lists_every_name() -> None:
    topology = Topology("orders", partitions=3)
    assert topology.exchange == "orders"
    assert topology.queues == ["orders.p0", "orders.p1", "orders.p2"]
    assert topology.dead_letters == "orders.dlq"


@pytest.mark.parametrize("service", ["S", "a", "orders", "my-svc_2"])
def test_pattern_matches_every_partition(service: str) -> None:
    pattern = re.compile(partition_pattern(service))
    for index in (0, 1, 7, 10, 123, 1023):
        assert pattern.search(partition_queue(service, index)), index
    for name in Topology(service, partitions=16).queues:
        assert pattern.search(name)


@pytest.mark.parametrize(
    ("service", "name"),
    [
        ("S", "S.dlq"),
        ("S", "S.p"),
        ("S", "S.px"),
        ("S", "S.p1.x"),
        ("S", "S.p1x"),
        ("S", "S.p-1"),
        ("S", "S.members"),
        ("S", "S"),
        ("S", "S2.p0"),
        ("S", "xS.p0"),
        ("S", "S.S.p0"),
        ("S", "SXp0"),
        ("a", "a-b.p0"),
        ("a", "a_b.p0"),
        ("a", "b.p0"),
        ("a-b", "a.p0"),
        ("a-b", "aXb.p0"),
        ("orders", "orders.p0.dlq"),
    ],
)
def test_pattern_matches_nothing_else(service: str, name: str) -> None:
    assert re.search(partition_pattern(service), name) is None


def test_pattern_is_the_contract_regex() -> None:
    """KEDA's manifests carry the same text: `^S\\.p\\d+$`, case-sensitive even for the
    management API, which matches names without regard to case."""
    assert partition_pattern("orders") == r"(?-i:^orders\.p\d+$)"
    assert partition_pattern("my-svc") == r"(?-i:^my\-svc\.p\d+$)"
    assert re.search(partition_pattern("orders"), "ORDERS.p0", re.IGNORECASE) is None


@pytest.mark.parametrize("service", ["a", "A1", "orders", "my-svc", "my_svc", "9lives", "x" * 100])
def test_valid_service_names(service: str) -> None:
    assert check_service_name(service) == service


@pytest.mark.parametrize(
    "service",
    ["", "a.b", "amq.x", "orders.p0", "-x", "_x", "a b", "a/b", "a*", "é", "x" * 101],
)
def test_invalid_service_names(service: str) -> None:
    with pytest.raises(ValueError, match="is not a service name"):
        check_service_name(service)


def test_trailing_newline_refused() -> None:
    with pytest.raises(ValueError, match="is not a service name"):
        check_service_name("svc\n")


@pytest.mark.parametrize("partitions", [0, -1, 1025])
def test_invalid_partition_counts(partitions: int) -> None:
    with pytest.raises(ValueError, match="partitions must be between 1 and 1024"):
        Topology("orders", partitions=partitions)


@pytest.mark.parametrize("partitions", [1, 1024])
def test_partition_count_bounds(partitions: int) -> None:
    assert len(Topology("orders", partitions=partitions).queues) == partitions


def test_topology_refuses_bad_service() -> None:
    with pytest.raises(ValueError, match="is not a service name"):
        Topology("a.b")


class RecordingChannel:
    """Records `declare_queue` calls the way the broker would receive them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def declare_queue(self, name: str, **kwargs: Any) -> AbstractQueue:
        self.calls.append((name, kwargs))
        return cast(AbstractQueue, object())


async def declared_arguments(topology: Topology) -> dict[str, Any]:
    channel = RecordingChannel()
    await declare_partition(cast(AbstractChannel, channel), topology, topology.queues[0])
    [(name, kwargs)] = channel.calls
    assert name == topology.queues[0]
    assert kwargs["durable"] is True
    arguments: dict[str, Any] = kwargs["arguments"]
    return arguments


async def test_partition_queue_arguments() -> None:
    arguments = await declared_arguments(Topology("orders", delivery_limit=7))
    assert arguments == {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,
        "x-delivery-limit": 7,
        "x-dead-letter-exchange": "orders.dead",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def test_max_length_only_when_set() -> None:
    arguments = await declared_arguments(Topology("orders", max_length=500))
    assert arguments["x-max-length"] == 500
    assert "x-max-length" not in await declared_arguments(Topology("orders"))


def test_default_delivery_limit_and_dead_letter_queue_spec() -> None:
    topology = Topology("orders")
    assert topology.partitions == 8
    assert topology.partition_args()["x_delivery_limit"] == 20
    assert topology.dead_letter_args() == {"x_queue_type": "quorum"}
