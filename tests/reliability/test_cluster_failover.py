"""A three-node RabbitMQ cluster of this session's own (`shared.cli.cluster`, as `proxymq cluster`
runs it): the partition queues are quorum queues with a replica on every node, the sidecars get
the list of the three node URLs. Under load, the node that leads partition 0's queue is killed
(SIGKILL of its VM: no goodbye to clients or peers). A new leader must be elected among the two
others, both sidecars must move to a live node, and nothing accepted may be lost or reordered.
The node is started again and rejoins; then the same is done to the new leader's node.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from shared import topology
from shared.cli.cluster import ClusterError, LocalCluster, Node
from tests.conftest import Stack
from tests.reliability.conftest import start_nodes
from tests.reliability.support import (
    TimedTarget,
    Traffic,
    report,
    running,
    summary,
    verify,
    wait_recovered,
)

pytestmark = [pytest.mark.rabbit, pytest.mark.reliability]
PARTITIONS = 4
RECOVERY_BOUND = 20.0  # seconds from the kill until every key is served again


@pytest.fixture(scope="module")
def cluster(state_dir: Path) -> Iterator[LocalCluster]:
    """Started once for this module, torn down at its end even when a test fails."""
    nodes = start_nodes(state_dir / "cluster", 3, "c")
    yield nodes
    nodes.destroy()


async def leader_elsewhere(cluster: LocalCluster, queue: str, dead: Node, timeout: float) -> Node:
    """The queue's new leader, once a live node reports one other than `dead`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            leader = await asyncio.to_thread(cluster.queue_leader, queue)
            if leader != dead:
                return leader
        except ClusterError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"{queue} has no leader besides {dead.name} after {timeout:g} s")


# rabbitmqctl alone: stop_app took 6 s on an idle machine, 20 s beside a busy suite
@pytest.mark.timeout(240)
async def test_kill_partition_leader_under_load(
    cluster: LocalCluster,
    stacks: Callable[[str], Stack],
    service: str,
    timed_target: TimedTarget,
    client: aiohttp.ClientSession,
) -> None:
    stack = stacks(cluster.urls())
    beat = ("--amqp-heartbeat", "2")
    await asyncio.gather(
        *(
            stack.dequeuer(
                service,
                timed_target.url,
                "--partitions",
                str(PARTITIONS),
                "--instance-id",
                n,
                *beat,
            )
            for n in ("d1", "d2")
        )
    )
    _, base = await stack.enqueuer(*beat)
    queue = topology.partition_queue(service, 0)
    members = cluster.management(cluster.nodes[0], f"/api/queues/%2F/{queue}")
    assert isinstance(members, dict)
    assert sorted(members["members"]) == sorted(n.name for n in cluster.nodes), members
    traffic = Traffic(f"{base}/{service}")
    kills: list[dict[str, object]] = []
    async with running(traffic, client):
        await asyncio.sleep(2)
        for _ in range(2):
            victim = await asyncio.to_thread(cluster.queue_leader, queue)
            await traffic.backlog(client, keys=4, per_key=5, work=0.3)
            killed = time.monotonic()
            await asyncio.to_thread(cluster.kill_node, victim)
            leader = await leader_elsewhere(cluster, queue, victim, RECOVERY_BOUND)
            elected = time.monotonic() - killed
            recovered = await wait_recovered(traffic, killed, RECOVERY_BOUND)
            await asyncio.sleep(1)
            restarted = time.monotonic()
            await asyncio.to_thread(cluster.start_node, victim)
            kills.append(
                {
                    "killed": victim.name,
                    "new_leader": leader.name,
                    "leader_elected_s": round(elected, 2),
                    "recovery_s": round(recovered, 2),
                    "node_rejoined_s": round(time.monotonic() - restarted, 2),
                }
            )
            running_nodes = await asyncio.to_thread(cluster.running_nodes, leader)
            assert len(running_nodes) == 3, running_nodes
        await asyncio.sleep(2)
    # A quorum queue nacks publishes while its leader is being elected; the enqueuer cannot
    # tell that nack from a full partition's and answers 429 (with Retry-After) for it.
    verdict = await verify(
        traffic,
        timed_target,
        client,
        statuses=frozenset({200, 202, 429, 503, 504}),
        logs=stack.log_text,
    )
    report(
        "cluster leader kill",
        {
            **verdict.figures,
            "kills": kills,
            "recovery_s": summary([float(str(k["recovery_s"])) for k in kills]),
            "leader_elected_s": summary([float(str(k["leader_elected_s"])) for k in kills]),
        },
    )
    verdict.check()
