"""The broker goes away under load and comes back: `stop_app`/`start_app` (the RabbitMQ
application stops, the VM stays) and a full node restart (the VM stops and boots again from its
data). Both sidecars must reconnect by themselves, declare again what they need and resume;
calls during the outage end as 200, 503 or 504 within their deadlines; a backlog the broker had
confirmed before the outage is processed after it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import aiohttp
import pytest

from shared.cli.cluster import LocalCluster
from tests.conftest import Stack, metric
from tests.reliability.proxy import FaultyProxy
from tests.reliability.support import (
    Call,
    TimedTarget,
    Traffic,
    report,
    running,
    summary,
    verify,
    wait_recovered,
)

pytestmark = [pytest.mark.rabbit, pytest.mark.reliability]
OUTAGE = 2.0  # seconds the broker stays away once it is down
RECOVERY_BOUND = 15.0  # broker back -> every key served again


async def start_pair(
    stack: Stack, service: str, target: TimedTarget, *dequeuers: str
) -> tuple[str, list[int]]:
    """An enqueuer and named dequeuers; returns the API URL of the service and admin ports."""
    started = await asyncio.gather(
        *(
            stack.dequeuer(service, target.url, "--partitions", "4", "--instance-id", name)
            for name in dequeuers
        )
    )
    enqueuer, url = await stack.enqueuer("--timeout", "10")
    ports = [p.admin_port for p in (enqueuer, *started)]  # type: ignore[attr-defined]
    return f"{url}/{service}", ports


def ring(node: LocalCluster, service: str) -> list[int]:
    """The partition of each bucket of the service's hash ring, read off the broker itself."""
    state = node.ctl(
        node.nodes[0], "eval", "ets:tab2list(rabbit_exchange_type_consistent_hash_ring_state)."
    )
    return [int(p) for p in re.findall(rf"<<\"{re.escape(service)}\.p(\d+)\">>", state)]


async def fault_cycle(
    name: str,
    down: Callable[[], object],
    up: Callable[[], object],
    traffic: Traffic,
    http: aiohttp.ClientSession,
    stopping: list[tuple[float, float]],
) -> tuple[list[Call], dict[str, float]]:
    """Queue a backlog, take the broker down for OUTAGE seconds, bring it back, wait until
    every key is served again. Returns the backlog and the timings; adds to `stopping` when
    the node was going down."""
    backlog = await traffic.backlog(http, keys=4, per_key=10, work=1.0)
    assert all(c.status == 202 for c in backlog), [c.status for c in backlog]
    fault = time.monotonic()
    await asyncio.to_thread(down)
    gone = time.monotonic()
    stopping.append((fault, gone))
    await asyncio.sleep(OUTAGE)
    await asyncio.to_thread(up)
    back = time.monotonic()
    recovered = await wait_recovered(traffic, back, RECOVERY_BOUND)
    timings = {
        "taking_down_s": round(gone - fault, 2),
        "outage_s": round(back - fault, 2),
        "recovery_s": round(recovered, 2),
    }
    print(name, timings)
    return backlog, timings


# rabbitmqctl alone: stop_app took 6 s on an idle machine, 20 s beside a busy suite
@pytest.mark.timeout(240)
async def test_stop_app_and_full_restart_under_load(
    node: LocalCluster,
    stacks: Callable[[str], Stack],
    service: str,
    timed_target: TimedTarget,
    client: aiohttp.ClientSession,
) -> None:
    only = node.nodes[0]
    stack = stacks(only.amqp_url())
    url, ports = await start_pair(stack, service, timed_target, "d1", "d2")
    traffic = Traffic(url)
    backlogs: list[Call] = []
    recoveries: dict[str, dict[str, float]] = {}
    rings: dict[str, list[int]] = {}
    stopping: list[tuple[float, float]] = []
    async with running(traffic, client):
        await asyncio.sleep(2)
        for name, down, up in (
            ("stop_app", lambda: node.ctl(only, "stop_app"), lambda: node.ctl(only, "start_app")),
            ("node restart", lambda: node.stop_node(only), lambda: node.start_node(only)),
        ):
            backlog, recoveries[name] = await fault_cycle(name, down, up, traffic, client, stopping)
            backlogs += backlog
            await asyncio.sleep(1)
            rings[name] = await asyncio.to_thread(ring, node, service)

    def lost_with_node(call: Call) -> bool:
        """Its one call was answered while the node was going down: its reply may have been
        confirmed into the reply queue just before the node took the queue with it."""
        arrivals = timed_target.arrivals.get((call.key, call.seq), [])
        return len(arrivals) == 1 and any(
            fault - 0.5 <= arrivals[0].at <= gone for fault, gone in stopping
        )

    verdict = await verify(
        traffic, timed_target, client, logs=stack.log_text, lost_with_node=lost_with_node
    )
    after = [
        c
        for c in backlogs
        if min((a.at for a in timed_target.arrivals.get((c.key, c.seq), [])), default=0.0)
        > c.started + OUTAGE
    ]
    reconnects = [await metric(client, port, "proxymq_broker_reconnects_total") for port in ports]
    report(
        "broker restart",
        {
            **verdict.figures,
            "recovery": recoveries,
            "recovery_s": summary([r["recovery_s"] for r in recoveries.values()]),
            "backlog_confirmed_before": len(backlogs),
            "backlog_processed_after_outage": len(after),
            "reconnects_per_sidecar": reconnects,
            "hash_ring_after": rings,
        },
    )
    verdict.check()
    assert all(r == [0, 1, 2, 3] for r in rings.values()), rings
    assert after, "no confirmed backlog was left for after the outage: the test proved nothing"
    assert all(r >= 2 for r in reconnects), reconnects


async def test_replies_wait_for_a_reconnecting_enqueuer(
    node: LocalCluster,
    stacks: Callable[[str], Stack],
    service: str,
    timed_target: TimedTarget,
    client: aiohttp.ClientSession,
) -> None:
    """The race behind lost results: after a restart the reply queue (transient) is gone until
    its enqueuer reconnects, and a dequeuer back first used to publish replies into nothing and
    ack their requests. Here the enqueuer is held off (its proxy refuses connections) for
    4 s after the broker is back, while the dequeuer works through a confirmed backlog: every
    202 must still get its result."""
    only = node.nodes[0]
    proxy = await FaultyProxy(only.port).start()
    try:
        stack = stacks(only.amqp_url())
        await stack.dequeuer(service, timed_target.url, "--partitions", "4")
        _, base = await stack.enqueuer(env={"PROXYMQ_AMQP_URL": proxy.url})
        traffic = Traffic(f"{base}/{service}")
        backlog = await traffic.backlog(client, keys=4, per_key=10, work=0.3)
        assert all(c.status == 202 for c in backlog)
        proxy.refuse()
        await asyncio.to_thread(node.ctl, only, "stop_app")
        await asyncio.to_thread(node.ctl, only, "start_app")
        await asyncio.sleep(4)
        proxy.heal()
        verdict = await verify(traffic, timed_target, client, settle=30, logs=stack.log_text)
        report("replies wait for a reconnecting enqueuer", verdict.figures)
        verdict.check()
    finally:
        await proxy.stop()
