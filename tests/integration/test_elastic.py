"""Dequeuers share a service's partitions: balanced, exclusive, failing over and handing over
without breaking per-key order. Dequeuers are separate processes; the microservice is the test's
own and records arrival order and in-flight requests per key."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from yarl import URL

from shared import topology
from shared.processes import Process
from tests.conftest import Stack, metric, serving
from tests.integration.test_async import poll
from tests.reliability.proxy import FaultyProxy
from tests.target import Target

pytestmark = pytest.mark.rabbit
PARTITIONS = 8
BALANCE_BOUND = 5.0  # seconds, the bound after a join or a leave


async def owned(http: aiohttp.ClientSession, process: Process) -> int:
    port = process.admin_port  # type: ignore[attr-defined]
    return int(await metric(http, port, "proxymq_dequeuer_partitions_owned"))


async def wait_balanced(
    http: aiohttp.ClientSession,
    live: list[Process],
    partitions: int = PARTITIONS,
    within: float = BALANCE_BOUND + 5,
) -> float:
    """Seconds until the live dequeuers own floor(N/D) or ceil(N/D) each and N in all."""
    started = time.monotonic()
    low, high = partitions // len(live), -(-partitions // len(live))
    counts: list[int] = []
    while time.monotonic() - started < within:
        counts = [await owned(http, p) for p in live]
        if sum(counts) == partitions and all(low <= c <= high for c in counts):
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"not balanced: {counts} for {partitions} partitions")


async def depths_shown(http: aiohttp.ClientSession, process: Process) -> int:
    """How many partitions `proxymq_dequeuer_queue_depth` has a sample for."""
    port = process.admin_port  # type: ignore[attr-defined]
    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    return sum(line.startswith("proxymq_dequeuer_queue_depth{") for line in text.splitlines())


@dataclass
class Load:
    """Requests with many keys, each key's requests sent in order, paced, async (202)."""

    url: str
    keys: int = 40
    sent: dict[str, int] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, http: aiohttp.ClientSession, rate: float = 150) -> None:
        for seq in itertools.count():
            for key in random.sample(range(self.keys), self.keys):
                if self.stop.is_set():
                    return
                name = f"k{key}"
                async with http.post(
                    f"{self.url}/keyed/{name}/{seq}?sleep=0.005",
                    headers={"X-Partition-Key": name, "Prefer": "respond-async"},
                ) as response:
                    assert response.status == 202, await response.text()
                self.sent[name] = seq + 1
                await asyncio.sleep(1 / rate)


@contextlib.asynccontextmanager
async def running(load: Load, http: aiohttp.ClientSession) -> AsyncIterator[Load]:
    task = asyncio.create_task(load.run(http))
    try:
        yield load
    finally:
        load.stop.set()
        await task


async def all_done(target: Target, load: Load, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while any(set(target.order.get(k, [])) != set(range(n)) for k, n in load.sent.items()):
            await asyncio.sleep(0.1)


def assert_ordered(target: Target, load: Load, *, duplicates_allowed: bool) -> None:
    for key, count in load.sent.items():
        arrivals = target.order[key]
        first_seen = list(dict.fromkeys(arrivals))
        assert first_seen == list(range(count)), f"{key} out of order: {arrivals}"
        if not duplicates_allowed:
            assert len(arrivals) == count, f"{key} processed twice: {arrivals}"
    assert target.max_in_flight_per_key == 1


async def start_dequeuers(
    stack: Stack, service: str, target: Target, *names: str, args: tuple[str, ...] = ()
) -> list[Process]:
    return list(
        await asyncio.gather(
            *(
                stack.dequeuer(
                    service,
                    target.url,
                    "--instance-id",
                    name,
                    "--partitions",
                    str(PARTITIONS),
                    *args,
                )
                for name in names
            )
        )
    )


async def test_balance_join_crash_leave(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """Under load: 1 dequeuer, add 2, SIGKILL one, SIGTERM one, add one back."""
    _, url = await stack.enqueuer()
    [first] = await start_dequeuers(stack, service, target, "d1")
    live = [first]
    timings: dict[str, float] = {}
    async with running(Load(f"{url}/{service}"), http) as load:
        timings["start"] = await wait_balanced(http, live)
        live += await start_dequeuers(stack, service, target, "d2", "d3")
        timings["join 2"] = await wait_balanced(http, live)
        await asyncio.sleep(1)
        victim = live.pop(1)
        victim.signal(signal.SIGKILL)
        timings["crash"] = await wait_balanced(http, live)
        await asyncio.sleep(1)
        leaver = live.pop(0)
        assert await asyncio.to_thread(leaver.stop) == 0
        timings["leave"] = await wait_balanced(http, live)
        await asyncio.sleep(1)
        live += await start_dequeuers(stack, service, target, "d4")
        timings["rejoin"] = await wait_balanced(http, live)
        await asyncio.sleep(1)
    await all_done(target, load)
    assert_ordered(target, load, duplicates_allowed=True)
    print(
        "balance reached after",
        {k: round(v, 2) for k, v in timings.items()},
        "with",
        sum(load.sent.values()),
        "requests",
    )
    assert all(t <= BALANCE_BOUND for t in timings.values()), timings


async def test_graceful_leave_processes_nothing_twice(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    _, url = await stack.enqueuer()
    dequeuers = await start_dequeuers(stack, service, target, "a", "b")
    await wait_balanced(http, dequeuers)
    async with running(Load(f"{url}/{service}"), http) as load:
        await asyncio.sleep(1.5)
        assert await asyncio.to_thread(dequeuers[0].stop) == 0
        await wait_balanced(http, dequeuers[1:])
        await asyncio.sleep(1)
    await all_done(target, load)
    assert_ordered(target, load, duplicates_allowed=False)


@pytest.mark.parametrize("count", [1, PARTITIONS, PARTITIONS + 2])
async def test_dequeuer_counts(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession, count: int
) -> None:
    """D = 1, D = N and D > N (the extra ones are hot standbys that own nothing)."""
    names = [f"n{i}" for i in range(count)]
    dequeuers = await start_dequeuers(stack, service, target, *names)
    await wait_balanced(http, dequeuers)  # with D > N: 0 or 1 each, N in all
    if count > PARTITIONS:  # a standby takes over a crashed owner's partition
        victim = None
        while victim is None:  # an owner, read when no handover is under way
            counts = [await owned(http, p) for p in dequeuers]
            if sum(counts) == PARTITIONS:
                victim = next(p for p, c in zip(dequeuers, counts, strict=True) if c >= 1)
            await asyncio.sleep(0.1)
        victim.signal(signal.SIGKILL)
        dequeuers.remove(victim)
        started = time.monotonic()
        await wait_balanced(http, dequeuers)
        assert time.monotonic() - started <= BALANCE_BOUND


async def test_failover_time(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A SIGKILLed dequeuer's partitions are processed again by the survivor within 5 s."""
    _, url = await stack.enqueuer()
    dequeuers = await start_dequeuers(stack, service, target, "x", "y")
    await wait_balanced(http, dequeuers)
    dequeuers[0].signal(signal.SIGKILL)
    killed = time.monotonic()
    keys = [f"f{i}" for i in range(32)]  # spread over every partition
    responses = await asyncio.gather(
        *(
            http.get(
                f"{url}/{service}/echo/{key}",
                headers={"X-Partition-Key": key, "X-Request-Timeout": "15"},
            )
            for key in keys
        )
    )
    elapsed = time.monotonic() - killed
    assert [r.status for r in responses] == [200] * len(keys)
    print(f"all partitions answered {elapsed:.2f} s after the kill")
    assert elapsed <= BALANCE_BOUND


async def test_deleted_partition_queue_comes_back(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
) -> None:
    _, url = await stack.enqueuer()
    [dequeuer] = await start_dequeuers(stack, service, target, "solo")
    await wait_balanced(http, [dequeuer])
    channel = await amqp.channel()
    await channel.queue_delete(topology.partition_queue(service, 0))
    async with asyncio.timeout(10):
        while not await topology.queue_exists(amqp, topology.partition_queue(service, 0)):
            await asyncio.sleep(0.2)
    keys = [f"d{i}" for i in range(32)]
    responses = await asyncio.gather(
        *(
            http.get(
                f"{url}/{service}/echo/{key}",
                headers={"X-Partition-Key": key, "X-Request-Timeout": "10"},
            )
            for key in keys
        )
    )
    assert [r.status for r in responses] == [200] * len(keys)
    queue = await channel.declare_queue(topology.partition_queue(service, 0), passive=True)
    assert queue.declaration_result.consumer_count == 1


async def test_stalled_dequeuer_never_runs_beside_its_successor(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """SIGSTOP (a long GC pause, CPU starvation) past the membership expiry: the others count
    it gone and subscribe, but single active consumer keeps it the only consumer of its
    partitions until it resumes; nothing is lost or reordered."""
    _, url = await stack.enqueuer()
    dequeuers = await start_dequeuers(stack, service, target, "s1", "s2")
    await wait_balanced(http, dequeuers)
    async with running(Load(f"{url}/{service}"), http) as load:
        await asyncio.sleep(1)
        dequeuers[0].signal(signal.SIGSTOP)
        await asyncio.sleep(4)
        dequeuers[0].signal(signal.SIGCONT)
        await wait_balanced(http, dequeuers)
        await asyncio.sleep(1)
    await all_done(target, load)
    assert_ordered(target, load, duplicates_allowed=False)


async def test_random_schedule(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A seeded random schedule of joins, crashes and graceful leaves, bounded in time."""
    rng = random.Random(20261123)
    _, url = await stack.enqueuer()
    live = await start_dequeuers(stack, service, target, "r0")
    names = itertools.count(1)
    deadline = time.monotonic() + 15
    async with running(Load(f"{url}/{service}"), http) as load:
        while time.monotonic() < deadline:
            action = rng.choice(["join", "join", "crash", "leave"])
            if action == "join" or len(live) == 1:
                live += await start_dequeuers(stack, service, target, f"r{next(names)}")
            elif action == "crash":
                live.pop(rng.randrange(len(live))).signal(signal.SIGKILL)
            else:
                assert await asyncio.to_thread(live.pop(rng.randrange(len(live))).stop) == 0
            assert await wait_balanced(http, live) <= BALANCE_BOUND
            await asyncio.sleep(rng.uniform(0.2, 1.5))
    await all_done(target, load)
    assert_ordered(target, load, duplicates_allowed=True)


async def test_redelivery_after_a_crash_is_marked(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A request whose dequeuer died mid-call is delivered again, and the microservice is told
    so (X-ProxyMQ-Earlier-Deliveries), so an idempotent service can check for a duplicate."""
    _, url = await stack.enqueuer()
    [first] = await start_dequeuers(stack, service, target, "crashy")
    async with http.get(f"{url}/{service}/delay/1", headers={"Prefer": "respond-async"}) as r:
        assert r.status == 202
    async with asyncio.timeout(5):
        while not target.seen:
            await asyncio.sleep(0.05)
    first.signal(signal.SIGKILL)
    await start_dequeuers(stack, service, target, "survivor")
    async with asyncio.timeout(15):
        while len(target.seen) < 2:
            await asyncio.sleep(0.1)
    again = dict(target.seen[1].headers)
    assert again["X-ProxyMQ-Earlier-Deliveries"] == "1"
    assert again["X-ProxyMQ-Attempt"] == "1"
    assert "X-ProxyMQ-Earlier-Deliveries" not in dict(target.seen[0].headers)


async def test_requests_not_started_when_the_connection_drops_are_called_once(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """The dequeuer's connection is reset while a key's first request runs and five more of
    that key wait behind it. Those five were never started: the broker delivers them again,
    and the microservice must see each once. It saw each twice: the dequeuer went on calling
    it with the requests it no longer held, then again with their redeliveries."""
    proxy = await FaultyProxy(URL(stack.amqp_url).port or 5672).start()
    try:
        _, url = await stack.enqueuer()
        dequeuer = await stack.dequeuer(
            service, target.url, "--partitions", "1", env={"PROXYMQ_AMQP_URL": proxy.url}
        )
        locations = []
        for seq in range(6):
            async with http.post(
                f"{url}/{service}/keyed/k/{seq}?sleep={2 if seq == 0 else 0.01}",
                headers={"X-Partition-Key": "k", "Prefer": "respond-async"},
            ) as response:
                assert response.status == 202
                locations.append(response.headers["Location"])
        async with asyncio.timeout(10):
            while not target.order["k"]:  # the first runs, the others wait behind it
                await asyncio.sleep(0.05)
        assert proxy.reset() == 1
        for location in locations:
            assert (await poll(http, url + location, timeout=30)).status == 200
        admin, replied = dequeuer.admin_port, {"outcome": "replied"}  # type: ignore[attr-defined]
        async with asyncio.timeout(30):  # each acked once: nothing is left to deliver
            while await metric(http, admin, "proxymq_dequeuer_messages_total", replied) < 6:
                await asyncio.sleep(0.1)
        arrivals = target.order["k"]
        assert [seq for seq in arrivals if seq > 0] == [1, 2, 3, 4, 5], arrivals
    finally:
        await proxy.stop()


async def test_a_rebalance_cut_by_a_lost_connection_is_finished_after_it(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """A dequeuer whose connection goes silent takes its peer for gone and subscribes to the
    peer's partitions, into the silence, until heartbeats give the connection up. Once it is
    back it must still follow the membership: share with its peer, take every partition
    when the peer dies, and stop at once on SIGTERM. It did none of these: the lost
    connection failed the subscribe with CancelledError, which ended the task that moves
    subscriptions for good."""
    proxy = await FaultyProxy(URL(stack.amqp_url).port or 5672).start()
    try:
        behind = await stack.dequeuer(
            service,
            target.url,
            *("--instance-id", "behind", "--partitions", str(PARTITIONS)),
            *("--amqp-heartbeat", "1"),
            env={"PROXYMQ_AMQP_URL": proxy.url},
        )
        [peer] = await start_dequeuers(stack, service, target, "peer")
        await wait_balanced(http, [behind, peer])
        proxy.blackhole()
        await asyncio.sleep(9)  # expiry 2.5 s, then given up after (1 + 1) x 3 s
        proxy.heal()
        await wait_balanced(http, [behind, peer])
        peer.signal(signal.SIGKILL)
        await wait_balanced(http, [behind])
        async with asyncio.timeout(20):  # its backlog gauge follows (one look every 5 s)
            while await depths_shown(http, behind) < PARTITIONS:
                await asyncio.sleep(0.5)
        started = time.monotonic()
        assert await asyncio.to_thread(behind.stop, 20) == 0
        assert time.monotonic() - started < 15
    finally:
        await proxy.stop()


async def test_stopping_while_subscribing_into_a_silent_broker(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """SIGTERM while a subscribe waits on a broker gone silent (the dequeuer took its peer,
    unheard since, for gone): it stops within its grace. It waited until the heartbeats gave
    the connection up (48 s with the default --amqp-heartbeat 15), then 1 s more per partition
    it had wanted, since its partitions were given up only by the task stuck in the subscribe;
    its own partitions went on starting the requests they held meanwhile."""
    proxy = await FaultyProxy(URL(stack.amqp_url).port or 5672).start()
    try:
        behind = await stack.dequeuer(
            service,
            target.url,
            *("--instance-id", "behind", "--partitions", str(PARTITIONS)),
            *("--shutdown-grace", "5"),
            env={"PROXYMQ_AMQP_URL": proxy.url},
        )
        assert behind.popen is not None
        [peer] = await start_dequeuers(stack, service, target, "peer")
        await wait_balanced(http, [behind, peer])
        log = stack.logs / "proxymq-dequeuer-0.log"
        taken = f"partitions of this dequeuer: {','.join(map(str, range(PARTITIONS)))} "
        before = log.read_text().count(taken)  # once already, before the peer came
        proxy.blackhole()
        async with asyncio.timeout(20):
            while log.read_text().count(taken) == before:
                await asyncio.sleep(0.1)
        await asyncio.sleep(1)
        started = time.monotonic()
        behind.signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(behind.popen.wait, 40)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - started
    finally:
        await proxy.stop()
    assert code == 0, f"exit code {code} after {took:.0f} s"
    assert took < 15, f"stopped {took:.0f} s after SIGTERM, with a 5 s grace"


@pytest.mark.parametrize("member", [5, ["a"], None])
async def test_a_heartbeat_naming_no_member_is_ignored(
    stack: Stack,
    service: str,
    target: Target,
    http: aiohttp.ClientSession,
    amqp: AbstractRobustConnection,
    member: object,
) -> None:
    """A heartbeat whose `id` is no string (another client's message on `S.members`) is
    ignored. One with a number made every dequeuer of the service stop heartbeating for good
    (sorting the members failed in the heartbeat task), so none took over when another died."""
    dequeuers = await start_dequeuers(stack, service, target, "m1", "m2")
    await wait_balanced(http, dequeuers)
    channel = await amqp.channel()
    exchange = await channel.get_exchange(topology.members_exchange(service))
    beat = {"id": member, "available": True, "leaving": False}
    await exchange.publish(aio_pika.Message(json.dumps(beat).encode()), routing_key="")
    await asyncio.sleep(1)
    dequeuers.pop(0).signal(signal.SIGKILL)
    await wait_balanced(http, dequeuers)


async def test_dequeuers_with_other_heartbeat_settings_agree_on_the_members(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """During a rollout that changes `--heartbeat-interval`, old and new dequeuers run side by
    side. Each member is judged by the expiry it announces: judged by the reader's own 2.5 s,
    a dequeuer beating every 3 s was taken for gone between its heartbeats, and partitions
    changed hands every few seconds (each handover counting against the held requests'
    delivery limit)."""
    [usual] = await start_dequeuers(stack, service, target, "usual")
    [slow] = await start_dequeuers(
        stack, service, target, "slow", args=("--heartbeat-interval", "3", "--member-expiry", "7")
    )
    await wait_balanced(http, [usual, slow])
    await asyncio.sleep(4)  # the slow one's first heartbeat may have come late
    port = usual.admin_port  # type: ignore[attr-defined]
    before = await metric(http, port, "proxymq_dequeuer_rebalances_total")
    await asyncio.sleep(10)
    assert await metric(http, port, "proxymq_dequeuer_rebalances_total") == before
    await wait_balanced(http, [usual, slow])


async def test_a_connection_dying_with_its_writes_blocked_leaves_no_key_stuck(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """The path to the broker stops taking data while the dequeuer publishes large replies:
    its socket fills, and aiormq's queue of frames for the writer too. When heartbeats give the
    connection up, the publishes and acks waiting for room there were never woken: their keys'
    lanes stayed stuck for good, and every later request of those keys got 504 (6 of 24 keys
    in the first run). They are given up with the connection, and delivered again."""
    proxy = await FaultyProxy(URL(stack.amqp_url).port or 5672).start()
    try:
        _, url = await stack.enqueuer()
        dequeuer = await stack.dequeuer(
            service,
            target.url,
            *("--partitions", "1", "--amqp-heartbeat", "1"),
            env={"PROXYMQ_AMQP_URL": proxy.url},
        )
        await wait_balanced(http, [dequeuer], partitions=1)
        keys = [f"w{i}" for i in range(24)]

        async def large(key: str) -> None:  # 4 MB answers, streamed, so still being read
            async with http.get(
                f"{url}/{service}/bytes/4000000?chunked=1",
                headers={"X-Partition-Key": key, "Prefer": "respond-async"},
            ) as response:
                assert response.status == 202

        await asyncio.gather(*(large(key) for key in keys))
        async with asyncio.timeout(10):
            while not target.seen:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # stalled while the replies go out (the bug showed 1 run in 2)
        assert proxy.stall() == 1
        await asyncio.sleep(9)  # given up after (1 + 1) x 3 s
        proxy.heal()
        answers = await asyncio.gather(
            *(
                http.get(
                    f"{url}/{service}/echo/{key}",
                    headers={"X-Partition-Key": key, "X-Request-Timeout": "40"},
                )
                for key in keys
            )
        )
        assert [a.status for a in answers] == [200] * len(keys)
    finally:
        await proxy.stop()


async def test_a_dequeuer_whose_breaker_opens_hands_its_partitions_to_healthy_ones(
    stack: Stack, service: str, target: Target, http: aiohttp.ClientSession
) -> None:
    """Two dequeuers, one in front of a microservice that fails every call (but answers its
    readiness probe). Its breaker opened and its partitions stalled: their requests waited in
    RabbitMQ, and timed out, while the other dequeuer idled. It hands them over as a paused
    dequeuer does, and takes its share back once its microservice answers again."""
    broken, served = [True], [0]

    async def failing(request: web.Request) -> web.StreamResponse:
        if broken[0]:
            return web.Response(status=503, text="broken")
        served[0] += 1
        return await target.keyed(request)

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ready")

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_route("*", "/keyed/{key}/{seq}", failing)
    args = (
        *("--partitions", str(PARTITIONS), "--ready-path", "/ready"),
        *("--breaker-failures", "2", "--breaker-reset", "1"),
        *("--max-attempts", "5", "--retry-backoff-ms", "100"),
    )
    async with serving(app) as failing_url:
        _, url = await stack.enqueuer()
        healthy = await stack.dequeuer(service, target.url, "--instance-id", "healthy", *args)
        sick = await stack.dequeuer(service, failing_url, "--instance-id", "sick", *args)
        await wait_balanced(http, [healthy, sick])
        sent: dict[str, int] = {}

        async def key_in_order(key: str, first: int, count: int) -> list[int]:
            statuses = []
            for seq in range(first, first + count):
                async with http.post(
                    f"{url}/{service}/keyed/{key}/{seq}",
                    headers={"X-Partition-Key": key, "X-Request-Timeout": "20"},
                ) as response:
                    statuses.append(response.status)
                sent[key] = seq + 1
            return statuses

        keys = [f"b{i}" for i in range(16)]
        rounds = await asyncio.gather(*(key_in_order(key, 0, 5) for key in keys))
        assert [s for r in rounds for s in r] == [200] * 5 * len(keys)
        assert "paused: the circuit breaker is open" in stack.log_text()
        broken[0] = False
        await wait_balanced(http, [healthy, sick], within=60)
        rounds = await asyncio.gather(*(key_in_order(key, 5, 5) for key in keys))
        assert [s for r in rounds for s in r] == [200] * 5 * len(keys)
    assert served[0] > 0, "the sick dequeuer's share was not taken back"
    for key, count in sent.items():
        assert list(dict.fromkeys(target.order[key])) == list(range(count)), target.order[key]
